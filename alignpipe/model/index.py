"""An approximate nearest-neighbour index of a store in a run's shared space (usearch HNSW).

Built once per (store, run): the store's searchable rows are read a chunk at a time, mapped
through the run's head, normalised and added to an inner-product HNSW graph whose keys are the
store's row numbers. It is saved beside the latents, ``<store>/indexes/<run-key>.usearch``, with a
JSON record of what it was built from (the store's content identity: its completion markers,
which list every unit file's sha256; the heads' sha256; the index settings). A later search
reuses it when the record still matches and rebuilds it otherwise, so an index never answers
for another store or another head. usearch is an optional extra: ``pip install
'alignpipe[index]'``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignpipe.data.pairing import encoder_identity, read_rows
from alignpipe.data.store import LatentStore
from alignpipe.model.aligned import AlignedModel
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import atomic_path, atomic_write_json, os_errors

if TYPE_CHECKING:
    from types import ModuleType

INDEX_FORMAT, INDEX_VERSION = "alignpipe-index", 1
INDEX_FOLDER = "indexes"
INSTALL_HINT = "pip install 'alignpipe[index]'"
# HNSW settings: M, efConstruction, efSearch (at least 2·k at search time). On clustered
# latents these give recall@10 ≈ 1; on structureless Gaussian rows about 0.98.
CONNECTIVITY, EXPANSION_ADD, EXPANSION_SEARCH = 16, 128, 128
VECTOR_DTYPE = "f16"  # normalised vectors lose ~1e-3 of their score at half the size of f32


class IndexUnavailable(AlignpipeError):
    """The approximate index cannot be used (extra missing, sparse encodings, bad file)."""


def usearch() -> ModuleType:
    """The usearch index module, or one clear line on how to install it."""
    try:
        from usearch import index
    except ImportError:
        raise IndexUnavailable(f"the approximate index (--index) needs usearch, which is not "
                          f"installed: {INSTALL_HINT}") from None
    return index


def available() -> bool:
    """Whether usearch is installed (``--auto-index`` falls back to exact search without it)."""
    try:
        usearch()
    except IndexUnavailable:
        return False
    return True


def store_identity(store: LatentStore) -> str:
    """sha256 of what the store's searchable content depends on: its shape, encoder and
    manifest, and every finished unit's completion marker (the sha256 of each file it wrote,
    and when): re-embedding or importing any unit changes it."""
    markers = {str(unit): store.unit_marker(unit) for unit in store.done_units()}
    content = {"rows": store.rows, "dim": store.dim, "dtype": store.dtype,
               "encoder": encoder_identity(store),
               "manifest_sha256": store.manifest_info.get("sha256"), "units": markers}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def heads_sha256(model: AlignedModel) -> str:
    """sha256 over the fitted method's tensors (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.method.state_tensors().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def index_path(store: LatentStore, model: AlignedModel) -> Path:
    """``<store>/indexes/<run name>-<hash of the run's location>.usearch``: one file per run,
    replaced when that run's heads change."""
    folder = model.info.get("run") or model.info.get("export")
    where = str(Path(folder).resolve()) if folder else model.name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name) or "run"
    key = hashlib.sha256(where.encode()).hexdigest()[:10]
    return store.path / INDEX_FOLDER / f"{safe}-{key}.usearch"


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


@dataclass
class StoreIndex:
    """An opened (memory-mapped) index and the record it was built from."""

    path: Path
    record: dict
    index: Any

    def search(self, query: np.ndarray, k: int,
               threads: int | None = None) -> list[tuple[list[int], list[float]]]:
        """(rows, scores) of the top `k` per query row (normalised float32), best first."""
        self.index.expansion_search = max(EXPANSION_SEARCH, 2 * k)
        matches = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k,
                                    threads=threads or torch.get_num_threads())
        keys = np.atleast_2d(matches.keys)  # one query: a `Matches` of its hits only
        distances = np.atleast_2d(matches.distances)
        counts = getattr(matches, "counts", [keys.shape[1]])
        # usearch's inner-product distance is 1 - dot: the score is the cosine back
        return [(keys[q, :n].astype(np.int64).tolist(), (1.0 - distances[q, :n]).tolist())
                for q, n in enumerate(np.asarray(counts).tolist())]


def _wanted(store: LatentStore, model: AlignedModel, modality: str, dim: int) -> dict:
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "library": "usearch",
            "metric": "ip", "dtype": VECTOR_DTYPE, "connectivity": CONNECTIVITY,
            "expansion_add": EXPANSION_ADD, "modality": modality, "dim": dim,
            "store_identity": store_identity(store), "heads_sha256": heads_sha256(model)}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _matches(record: dict | None, wanted: dict, path: Path) -> bool:
    if record is None or any(record.get(key) != value for key, value in wanted.items()):
        return False
    try:
        return path.stat().st_size == record.get("size")
    except FileNotFoundError:
        return False


def _open(path: Path, record: dict) -> StoreIndex:
    index = usearch().Index.restore(str(path), view=True)
    if index is None:
        raise IndexUnavailable(f"{path}: not a readable usearch index; delete it to rebuild it")
    return StoreIndex(path, record, index)


def _build(path: Path, store: LatentStore, model: AlignedModel, modality: str,
           rows: np.ndarray, wanted: dict, chunk_rows: int, progress: bool) -> StoreIndex:
    """Add `rows` a chunk at a time (memory: one chunk plus the index), save, then record."""
    from contextlib import nullcontext

    from alignpipe.util.progress import progress_bar

    index = usearch().Index(ndim=wanted["dim"], metric="ip", dtype=VECTOR_DTYPE,
                            connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD)
    bar = progress_bar(speed_unit="rows", stderr=True) if progress else nullcontext()
    began = time.time()
    with bar:
        task = bar.add_task(f"index {store.path.name} for {model.name}",
                            total=int(rows.size)) if progress else None
        for start in range(0, rows.size, chunk_rows):
            chunk = rows[start:start + chunk_rows]
            with torch.inference_mode():
                encoded = model.encode_latents(modality, read_rows(store, chunk, np.float32))
            vectors = torch.nn.functional.normalize(encoded.float(), dim=1).cpu().numpy()
            index.add(chunk.astype(np.uint64), vectors, threads=torch.get_num_threads())
            if progress:
                bar.advance(task, int(chunk.size))
    record_file = _record_path(path)
    with os_errors(path):
        record_file.unlink(missing_ok=True)  # never a stale record beside a new file
        with atomic_path(path) as tmp:
            index.save(str(tmp))
        size = path.stat().st_size
    record = {**wanted, "count": int(rows.size), "size": size, "store": str(store.path),
              "run": model.name, "seconds": round(time.time() - began, 3),
              "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(record_file, record)
    return _open(path, record)


def store_index(model: AlignedModel, store: LatentStore, modality: str, dim: int,
                rows: Callable[[], np.ndarray], *, chunk_rows: int,
                progress: bool = False) -> StoreIndex:
    """The saved index of `store` through `model`'s head, rebuilt first when it is missing or
    was built from another store content, another head or other settings. `rows` gives the
    searchable rows (valid, one per media item), asked for only when building."""
    usearch()
    path = index_path(store, model)
    wanted = _wanted(store, model, modality, dim)
    record = _read_record(path)
    if _matches(record, wanted, path):
        return _open(path, record)
    return _build(path, store, model, modality, rows(), wanted, chunk_rows, progress)
