"""What every manifest builder shares: how media cells are written, how missing files are handled,
the row buffer, and the summary a build returns.

Cells are written relative to the manifest's folder when the file lies inside it (so a dataset
folder that holds its manifest can be moved as a whole) and absolute otherwise (so a manifest kept
apart from its data survives being moved on its own). An archive member is ``ARCHIVE.tar::MEMBER``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from alignpipe.errors import ManifestError
from alignpipe.manifest import PATH_COLUMNS, SPLITS, validate, write_manifest

CheckPolicy = Literal["error", "skip", "off"]
CHECK_POLICIES: tuple[str, ...] = ("error", "skip", "off")
ARCHIVE_SEP = "::"
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac"})
SHOWN = 10  # how many offending names a message lists before "(and N more)"


def listing(items: Sequence[str], limit: int = SHOWN, sep: str = ", ") -> str:
    """``a, b, c (and 40 more)``: enough names to find the problem without flooding the terminal."""
    shown = sep.join(str(i) for i in items[:limit])
    rest = len(items) - limit
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def media_cell(path: Path, manifest_dir: Path) -> str:
    """The manifest cell for `path`: relative to `manifest_dir` if inside it, else absolute."""
    # abspath, not resolve: following symlinks would turn a linked dataset into an absolute path.
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(manifest_dir).as_posix()
    except ValueError:
        return str(absolute)


def archive_cell(archive: Path, member: str, manifest_dir: Path) -> str:
    return f"{media_cell(archive, manifest_dir)}{ARCHIVE_SEP}{member}"


def cell_file(cell: str, manifest_dir: Path) -> Path:
    """The file a cell needs on disk (the archive itself for ``ARCHIVE::MEMBER``)."""
    path = Path(cell.split(ARCHIVE_SEP, 1)[0])
    return path if path.is_absolute() else manifest_dir / path


def manifest_dir_of(out: str | Path) -> Path:
    return Path(os.path.abspath(Path(out).parent))


def check_policy(check_files: bool, skip_missing: bool) -> CheckPolicy:
    """CLI flags -> policy: off (trust the paths), skip (drop rows, report), error (refuse)."""
    if not check_files:
        return "off"
    return "skip" if skip_missing else "error"


def has_ext(path: Path | str, exts: frozenset[str]) -> bool:
    return os.path.splitext(str(path))[1].lower() in exts


class FileIndex:
    """Existence checks from cached directory listings: one listdir per folder instead of one
    stat per file, which matters for millions of files on a network file system."""

    def __init__(self) -> None:
        self._listings: dict[Path, frozenset[str]] = {}

    def exists(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._listings:
            try:
                self._listings[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._listings[folder] = frozenset()
        return path.name in self._listings[folder]


class Rows:
    """Manifest columns being filled row by row, in a fixed column order."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.data: dict[str, list] = {c: [] for c in columns}

    def add(self, **cells: str | None) -> None:
        unknown = {k for k, v in cells.items() if k not in self.data and v is not None}
        if unknown:
            raise KeyError(f"unknown manifest columns {sorted(unknown)}")
        for name, values in self.data.items():
            values.append(cells.get(name))

    def __len__(self) -> int:
        return len(self.data["id"])

    def keep(self, rows: Iterable[int]) -> None:
        kept = list(rows)
        self.data = {name: [values[i] for i in kept] for name, values in self.data.items()}

    def table(self) -> pa.Table:
        return pa.table({name: pa.array(values, pa.string()) for name, values in self.data.items()})


@dataclass
class BuildResult:
    """What a builder wrote, for the CLI to print and for callers to inspect."""

    path: Path
    rows: int
    splits: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"wrote {self.path} ({self.rows} rows"]
        if self.splits:
            parts.append(": " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        text = "".join(parts) + ")"
        if self.skipped:
            text += "; left out " + ", ".join(f"{v} {k}" for k, v in self.skipped.items())
        return text


def missing_media(rows: Rows, manifest_dir: Path) -> list[tuple[int, str]]:
    """(row, cell) for every image/audio cell whose file is not on disk."""
    index = FileIndex()
    missing = []
    for name in PATH_COLUMNS:
        for i, cell in enumerate(rows.data.get(name, [])):
            if cell and not index.exists(cell_file(cell, manifest_dir)):
                missing.append((i, cell))
    return missing


def apply_check(rows: Rows, manifest_dir: Path, policy: CheckPolicy, where: str) -> int:
    """Refuse, or drop, rows whose media is missing; returns how many rows were dropped."""
    if policy == "off":
        return 0
    missing = missing_media(rows, manifest_dir)
    if not missing:
        return 0
    cells = sorted({cell for _, cell in missing})
    if policy == "error":
        raise ManifestError(
            f"{where}: {len(cells)} media file(s) listed for {len({i for i, _ in missing})} of "
            f"{len(rows)} rows are missing: {listing(cells)} (paths relative to {manifest_dir} "
            "unless absolute). Pass --skip-missing to leave those rows out, or --no-check-files "
            "to write them anyway (embedding will then record them as failed rows).")
    bad = {i for i, _ in missing}
    rows.keep(i for i in range(len(rows)) if i not in bad)
    return len(bad)


def finish(rows: Rows, out: str | Path, policy: CheckPolicy, where: str,
           skipped: dict[str, int] | None = None) -> BuildResult:
    """Check media, validate against the manifest format, and write `out` atomically."""
    out = Path(out)
    skipped = {k: v for k, v in (skipped or {}).items() if v}
    dropped = apply_check(rows, manifest_dir_of(out), policy, where)
    if dropped:
        skipped["rows with missing media"] = dropped
    if not len(rows):
        raise ManifestError(f"{where}: no rows left to write")
    table = validate(rows.table(), out)
    write_manifest(table, out)
    splits = dict(Counter(rows.data["split"])) if "split" in rows.data else {}
    return BuildResult(path=out, rows=len(rows), splits=splits, skipped=skipped)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a BOM is dropped), or a ManifestError saying which file failed."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a folder; expected the {what} file") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: {what} is not UTF-8 text ({err.reason} at byte "
                            f"{err.start})") from None


def require_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ManifestError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise ManifestError(f"{path}: {what} not found")
    if not path.is_dir():
        raise ManifestError(f"{path}: expected {what} to be a folder")
    return path
