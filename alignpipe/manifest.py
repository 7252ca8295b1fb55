"""Manifests: the table of rows that every store and run refers to.

A manifest is one parquet table (CSV, TSV and JSONL are accepted and converted on read) with
columns ``id`` (unique, non-empty string), any of ``image``/``text``/``audio`` and optionally
``label`` and ``split``. ``image`` and ``audio`` hold media paths, relative to the manifest's
folder or absolute; ``text`` holds the text itself. Row i of every store made from a manifest is
row i of that manifest, so the file's bytes (its sha256) identify the row order.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from alignpipe.errors import ManifestError, format_rows
from alignpipe.fsutil import atomic_path

MEDIA_COLUMNS = ("image", "text", "audio")
PATH_COLUMNS = ("image", "audio")
SPLITS = ("train", "val", "test")
SUFFIXES = {
    ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
}


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    """A validated manifest table plus where it came from."""

    path: Path
    table: pa.Table
    sha256: str
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        """Folder that relative media paths are resolved against."""
        return self.path.parent

    @property
    def rows(self) -> int:
        return self.table.num_rows

    @property
    def name(self) -> str:
        """Default dataset name: the file stem."""
        return self.path.stem

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    @property
    def media_columns(self) -> list[str]:
        return [c for c in MEDIA_COLUMNS if c in self.table.column_names]

    def column(self, name: str) -> list:
        if name not in self.table.column_names:
            raise ManifestError(f"{self.path}: manifest has no column {name!r} "
                                f"(it has {', '.join(self.table.column_names)})")
        if name not in self._cache:
            self._cache[name] = self.table.column(name).to_pylist()
        return self._cache[name]

    @property
    def ids(self) -> list[str]:
        return self.column("id")

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def resolve(self, value: str | None) -> Path | None:
        """Absolute path of a media cell (None stays None)."""
        if value is None or value == "":
            return None
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def media_paths(self, name: str) -> list[Path | None]:
        """Resolved paths of an image/audio column, row by row."""
        return [self.resolve(v) for v in self.column(name)]

    def split_rows(self, split: str) -> list[int]:
        """Row numbers whose ``split`` equals `split` (all rows when there is no split column)."""
        if not self.has("split"):
            return list(range(self.rows))
        return [i for i, s in enumerate(self.column("split")) if s == split]

    def info(self) -> dict:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "rows": self.rows}


def _read_table(path: Path) -> pa.Table:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(
            f"{path}: unknown manifest format {path.suffix!r}; use .parquet, .csv, .tsv or .jsonl")
    try:
        if kind == "parquet":
            return pq.read_table(path)
        if kind in ("csv", "tsv"):
            delimiter = "\t" if kind == "tsv" else ","
            with open(path, newline="", encoding="utf-8") as handle:  # the header line only
                header = next(csv.reader(handle, delimiter=delimiter), [])
            # Every column as a string: ids like 000123 must not become integers.
            return pacsv.read_csv(
                path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in header},
                    strings_can_be_null=True, quoted_strings_can_be_null=False),
            )
        return pajson.read_json(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest file not found") from None
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        raise ManifestError(f"{path}: cannot read manifest as {kind}: {err}") from None


def _as_strings(table: pa.Table, name: str) -> pa.Table:
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return table
    if pa.types.is_null(col.type):
        return table.set_column(table.column_names.index(name), name, col.cast(pa.string()))
    return table.set_column(table.column_names.index(name), name, pc.cast(col, pa.string()))


def validate(table: pa.Table, path: Path) -> pa.Table:
    """Check the manifest format; raise ManifestError naming the first offending rows.

    Returns the table with ``id``, media, ``label`` and ``split`` columns as strings.
    """
    names = table.column_names
    if "id" not in names:
        raise ManifestError(f"{path}: missing required column 'id' (columns: {', '.join(names)})")
    if not any(c in names for c in MEDIA_COLUMNS):
        raise ManifestError(
            f"{path}: no media column; a manifest needs at least one of image, text, audio "
            f"(columns: {', '.join(names)})")
    for name in ("id", *MEDIA_COLUMNS, "label", "split"):
        if name in names:
            table = _as_strings(table, name)

    ids = table.column("id").to_pylist()
    empty = [i for i, v in enumerate(ids) if v is None or str(v).strip() == ""]
    if empty:
        raise ManifestError(f"{path}: empty id in column 'id' at rows {format_rows(empty)}")
    first_seen: dict[str, int] = {}
    duplicates: list[str] = []
    for i, v in enumerate(ids):
        if v in first_seen:
            duplicates.append(f"row {i} repeats row {first_seen[v]} ({v!r})")
        else:
            first_seen[v] = i
    if duplicates:
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise ManifestError(
            f"{path}: duplicate ids in column 'id': {'; '.join(duplicates[:5])}{more}")

    if "split" in names:
        splits = table.column("split").to_pylist()
        bad = [i for i, s in enumerate(splits) if s not in SPLITS]
        if bad:
            values = sorted({str(splits[i]) for i in bad})
            raise ManifestError(
                f"{path}: unknown split value(s) {', '.join(repr(v) for v in values)} in column "
                f"'split' at rows {format_rows(bad)}; allowed: {', '.join(SPLITS)}")
    return table


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest. Raises ManifestError before any work is done."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest file not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; give the manifest file inside it")
    table = validate(_read_table(path), path)
    return Manifest(path=path, table=table, sha256=file_sha256(path))


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    """Write a manifest as parquet, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
