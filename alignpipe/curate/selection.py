"""The selection file: which rows of a pool manifest were chosen, and by what rule.

A parquet of ``row, id, concept, score, rule`` whose schema metadata (key ``alignpipe``) holds
the pool manifest's sha256 and the curation spec. A selection names rows of a manifest; nothing
is re-embedded, and it is refused with any store of another manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import atomic_path

if TYPE_CHECKING:
    from collections.abc import Iterable

    from alignpipe.data.manifest import Manifest

META_KEY = b"alignpipe"
COLUMNS = ("row", "id", "concept", "score", "rule")


class SelectionError(AlignpipeError):
    """A selection file is missing, damaged, empty, or of another manifest."""


@dataclass
class Selection:
    rows: np.ndarray          # int64, ascending
    ids: list[str]
    concepts: list[str]
    scores: np.ndarray        # float32
    rules: list[str]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def manifest_sha256(self) -> str:
        return str(self.meta.get("pool", {}).get("manifest_sha256", ""))

    def table(self) -> pa.Table:
        table = pa.table({"row": pa.array(self.rows, pa.int64()), "id": pa.array(self.ids),
                          "concept": pa.array(self.concepts),
                          "score": pa.array(self.scores, pa.float32()),
                          "rule": pa.array(self.rules)})
        return table.replace_schema_metadata({META_KEY: json.dumps(self.meta).encode()})


def write_selection(selection: Selection, path: str | Path) -> Path:
    """Write the selection parquet atomically (a kill leaves the old file or the new one)."""
    path = Path(path)
    if len(selection) == 0:
        raise SelectionError(f"{path}: the selection is empty (no pool row passed the rules); "
                             f"nothing written: lower --threshold or raise --per-concept")
    with atomic_path(path) as tmp:
        pq.write_table(selection.table(), tmp)
    selection.path = path
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_selection(path: str | Path) -> Selection:
    """Read a selection, refusing a file that is not one (one line naming it)."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"{path}: no such selection file (make one with `alignpipe "
                             f"curate … --out {path}`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise SelectionError(f"{path}: not a readable parquet selection ({err})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if raw is None or missing:
        raise SelectionError(f"{path}: not an alignpipe selection (missing "
                             f"{', '.join(missing) or 'its alignpipe metadata'})")
    meta = json.loads(raw)
    rows = np.asarray(table["row"].to_numpy(), dtype=np.int64)
    if rows.size == 0:
        raise SelectionError(f"{path}: the selection is empty")
    if np.unique(rows).size != rows.size:
        raise SelectionError(f"{path}: a row is selected twice")
    return Selection(rows, table["id"].to_pylist(), table["concept"].to_pylist(),
                     np.asarray(table["score"].to_numpy(), dtype=np.float32),
                     table["rule"].to_pylist(), meta, path)


def check_selection(selection: Selection, manifest: Manifest) -> None:
    """Refuse a selection of another manifest (sha256), or whose rows no longer match its ids."""
    if selection.manifest_sha256 != manifest.sha256:
        raise SelectionError(
            f"{selection.path}: this selection was made from a pool manifest with sha256 "
            f"{selection.manifest_sha256[:12]}…, but the stores' manifest {manifest.path} has "
            f"sha256 {manifest.sha256[:12]}…; a selection names rows of one manifest only")
    if selection.rows.max() >= manifest.rows or selection.rows.min() < 0:
        raise SelectionError(f"{selection.path}: rows beyond the manifest's {manifest.rows}")
    ids = manifest.table.column("id").take(pa.array(selection.rows)).to_pylist()
    for row, id_, found in zip(selection.rows.tolist(), selection.ids, ids, strict=True):
        if found != id_:
            raise SelectionError(f"{selection.path}: row {row} has id {id_!r} but the manifest "
                                 f"{manifest.path} has {found!r} there")


def selection_record(selection: Selection) -> dict:
    """What a run records about a selection it trained on."""
    return {"path": str(selection.path), "sha256": file_sha256(Path(selection.path)),
            "rows": len(selection)}


def selection_identity(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """What a fit on these selection files is, by content (sha256 and rows), wherever they lie."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return [{"sha256": r["sha256"], "rows": r["rows"]}
            for r in (selection_record(read_selection(p)) for p in items)]
