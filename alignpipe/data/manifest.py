"""Manifests: the table of rows that every store and run refers to.

A manifest is one parquet table (CSV, TSV and JSONL are accepted and converted on read) with
columns ``id`` (unique, non-empty string), any of ``image``/``text``/``audio`` and optionally
``label`` and ``split``. ``image`` and ``audio`` hold media paths, relative to the manifest's
folder or absolute; ``text`` holds the text itself. Row i of every store made from a manifest is
row i of that manifest, so the file's bytes (its sha256) identify the row order.

Cells are the exact strings in the file: a CSV/TSV/JSONL is never type-inferred (``000123`` stays
``"000123"``, ``NA`` and ``null`` are text, a BOM is dropped); in a CSV/TSV only an empty cell is
null. Malformed files and columns that are not text are ManifestErrors naming the file and the
line or column.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alignpipe.util.constants import FILE_COLUMNS, MODALITIES, SPLITS  # noqa: F401  (re-exported)
from alignpipe.util.errors import ManifestError, format_rows
from alignpipe.util.fsutil import atomic_path

MEDIA_COLUMNS = MODALITIES  # a manifest's media columns are named after the modalities
# Columns read as exact strings (everything else is kept as stored).
STRING_COLUMNS = ("id", *MEDIA_COLUMNS, "label", "split", "class_id")
# Unicode categories a tokenizer drops: control (NUL), format (zero-width space, BOM), separators.
BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
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
            _duplicate_names(path, pq.read_schema(path).names)
            return pq.read_table(path)
        if kind in ("csv", "tsv"):
            return _read_delimited(path, "\t" if kind == "tsv" else ",", kind.upper())
        return _read_jsonl(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest file not found") from None
    except (pa.ArrowException, OSError, ValueError) as err:
        detail = " ".join(str(err).split())  # Arrow's messages span lines; the error is one
        raise ManifestError(f"{path}: cannot read manifest as {kind}: {detail[:300]}") from None


def _not_utf8(path: Path) -> ManifestError:
    """The error for a text manifest that is not UTF-8, naming the line of the first bad byte
    (the decoder works on blocks, so the file is read again to find it)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        return ManifestError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})")
    return ManifestError(f"{path}: not UTF-8 text")


def _duplicate_names(path: Path, names: list[str]) -> None:
    seen = set()
    twice = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    known = sorted({n for n in twice if n in STRING_COLUMNS})
    if known:
        raise ManifestError(f"{path}: column {known[0]!r} appears more than once in the header "
                            f"(columns: {', '.join(names)})")


@contextmanager
def _no_gc() -> Iterator[None]:
    """Millions of small lists and tuples make the cyclic GC run over and over (2.4x slower
    parsing); none of them can form a cycle, so pause it while they are built."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _read_delimited(path: Path, delimiter: str, kind: str) -> pa.Table:
    """A CSV/TSV with a header line, every cell the exact string in the file.

    Nothing is inferred: ``000123`` stays ``"000123"`` and ``NA``/``null``/``nan`` stay text; only
    an empty cell is null. A UTF-8 BOM is dropped. A quote that is never closed, a stray quote
    after a closed one, or a row with another number of fields than the header is a
    ManifestError naming the line where that row starts.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions are not an error
    rows: list[list[str]] = []
    start = 1  # line where the record being parsed starts
    with _no_gc(), open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ManifestError(f"{path}: file is empty; the first line must name the "
                                    "columns (id, image, text, ...)")
            _duplicate_names(path, header)
            width = len(header)
            start = reader.line_num + 1
            for fields in reader:
                if len(fields) != width and fields:
                    raise ManifestError(
                        f"{path}:{start}: malformed {kind}: {len(fields)} field(s) where the "
                        f"header has {width} ({', '.join(header)})"
                        + (" (a quoted cell spans lines; is a quote left open?)"
                           if reader.line_num != start else ""))
                if fields:
                    rows.append(fields)
                start = reader.line_num + 1
        except csv.Error as err:
            hint = (" (a quote opened in this row is never closed)"
                    if "end of data" in str(err) else "")
            raise ManifestError(f"{path}:{start}: malformed {kind}: {err}{hint}") from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    with _no_gc():
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in header]
    del rows
    arrays = []
    for values in columns:
        array = pa.array(values, pa.string())
        # An empty cell is the one null a CSV has; every other cell is kept as written.
        arrays.append(pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array))
    return pa.Table.from_arrays(arrays, names=header)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {twice!r} appears twice in one object")
    return out


def _read_jsonl(path: Path) -> pa.Table:
    """JSON Lines: one object per line. Strings are kept exactly (nothing becomes a timestamp or
    a number); integers in id/media/label/split/class_id columns become their decimal text;
    other values there (floats, booleans, lists, objects) are refused naming line and column."""
    records: list[dict] = []
    lines: list[int] = []
    names: dict[str, None] = {}
    number = 0
    try:
        with _no_gc(), open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):  # noqa: B007 - used in the messages
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
                except ValueError as err:
                    if number == 1 and line.lstrip().startswith("["):
                        raise ManifestError(f"{path}: is a JSON array; a manifest .jsonl/.json "
                                            "holds one JSON object per line") from None
                    raise ManifestError(f"{path}:{number}: not a JSON object: {err}") from None
                if isinstance(record, list) and not records:
                    raise ManifestError(f"{path}: is a JSON array; a manifest .jsonl/.json "
                                        "holds one JSON object per line")
                if not isinstance(record, dict):
                    raise ManifestError(f"{path}:{number}: expected a JSON object per line, got "
                                        f"{type(record).__name__}")
                records.append(record)
                lines.append(number)
                names.update(dict.fromkeys(record))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not records:
        raise ManifestError(f"{path}: no rows (expected one JSON object per line)")
    arrays = {}
    for name in names:
        values = [r.get(name) for r in records]
        if name in STRING_COLUMNS:
            for i, v in enumerate(values):
                if isinstance(v, int) and not isinstance(v, bool):
                    values[i] = str(v)
                elif v is not None and not isinstance(v, str):
                    raise ManifestError(
                        f"{path}:{lines[i]}: column {name!r} holds {json.dumps(v)[:40]} "
                        f"({type(v).__name__}); {name} values must be JSON strings")
            arrays[name] = pa.array(values, pa.string())
            continue
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            raise ManifestError(f"{path}: column {name!r} mixes value types from line to line "
                                "(e.g. text and numbers); give it one type") from None
    return pa.table(arrays)


def _bad_utf8_row(col: pa.ChunkedArray) -> int:
    for i, v in enumerate(col.to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return -1


def _as_strings(table: pa.Table, name: str, path: Path) -> pa.Table:
    """Column `name` as strings; text stays text, integers become their decimal text, binary
    must be UTF-8, and anything else (floats, lists, structs, ...) is refused."""
    col = table.column(name)
    kind = col.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    where = table.column_names.index(name)
    if (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and kind == col.type:
        return table
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind) \
            or pa.types.is_integer(kind):
        return table.set_column(where, name, pc.cast(col, pa.string()))
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) \
            or pa.types.is_fixed_size_binary(kind):
        try:
            return table.set_column(where, name, pc.cast(pc.cast(col, pa.binary()), pa.string()))
        except pa.ArrowInvalid:
            row = _bad_utf8_row(pc.cast(col, pa.binary()))
            raise ManifestError(f"{path}: column {name!r} holds bytes that are not UTF-8 text "
                                f"at row {row}") from None
    raise ManifestError(f"{path}: column {name!r} holds {col.type} values; {name} values must be "
                        "text (strings)")


def is_blank_text(value: object) -> bool:
    """True for text that tokenises to nothing: None, "", or only whitespace, control characters
    (NUL), format characters (zero-width spaces, joiners, a BOM, soft hyphens) and separators."""
    if value is None:
        return True
    for ch in str(value):
        if not ch.isspace() and unicodedata.category(ch) not in BLANK_CATEGORIES:
            return False
    return True


def validate(table: pa.Table, path: Path) -> pa.Table:
    """Check the manifest format; raise ManifestError naming the first offending rows.

    Returns the table with ``id``, media, ``label``, ``split`` and ``class_id`` columns as
    strings; other columns are kept as they are.
    """
    names = table.column_names
    if "id" not in names:
        raise ManifestError(f"{path}: missing required column 'id' (columns: {', '.join(names)})")
    if not any(c in names for c in MEDIA_COLUMNS):
        raise ManifestError(
            f"{path}: no media column; a manifest needs at least one of image, text, audio "
            f"(columns: {', '.join(names)})")
    if len(set(names)) != len(names):
        _duplicate_names(path, names)
    for name in STRING_COLUMNS:
        if name in names:
            table = _as_strings(table, name, path)

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
        raise ManifestError(
            f"{path}: duplicate ids in column 'id': {format_rows(duplicates, 5, '; ')}")

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
