"""What every manifest builder shares: how media cells are written, how missing files are handled,
the row buffer, and the summary a build returns.

Cells are written relative to the manifest's folder when the file lies inside it (so a dataset
folder that holds its manifest can be moved as a whole) and absolute otherwise (so a manifest kept
apart from its data survives being moved on its own). An archive member is ``ARCHIVE.tar::MEMBER``.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import pyarrow as pa

from alignpipe.data.manifest import FILE_COLUMNS, SPLITS, validate, write_manifest
from alignpipe.util.constants import ARCHIVE_SEPARATOR
from alignpipe.util.errors import ManifestError
from alignpipe.util.errors import format_rows as listing  # noqa: F401  (the builders' name for it)

CheckPolicy = Literal["error", "skip", "off"]
CHECK_POLICIES: tuple[str, ...] = ("error", "skip", "off")
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac"})


def media_cell(path: Path, manifest_dir: Path) -> str:
    """The manifest cell for `path`: relative to `manifest_dir` if inside it, else absolute."""
    # abspath, not resolve: following symlinks would turn a linked dataset into an absolute path.
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(manifest_dir).as_posix()
    except ValueError:
        return str(absolute)


def archive_cell(archive: Path, member: str, manifest_dir: Path) -> str:
    return f"{media_cell(archive, manifest_dir)}{ARCHIVE_SEPARATOR}{member}"


def cell_file(cell: str, manifest_dir: Path) -> Path:
    """The file a cell needs on disk (the archive itself for ``ARCHIVE::MEMBER``)."""
    path = Path(cell.split(ARCHIVE_SEPARATOR, 1)[0])
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
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"wrote {self.path} ({self.rows} rows"]
        if self.splits:
            parts.append(": " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        text = "".join(parts) + ")"
        if self.skipped:
            text += "; left out " + ", ".join(f"{v} {k}" for k, v in self.skipped.items())
        for note in self.notes:
            text += f"; {note}"
        return text


# ---- seeded train/val/test splits --------------------------------------------------------------
@dataclass(frozen=True)
class SplitPlan:
    """Assign train/val/test by hashing each item with `seed`: the same ids and seed give the
    same split whatever the row order, and each split gets its fraction of the items exactly,
    to within one item (largest remainders). Rows that share an image or audio file are one
    item, so five captions of one image never straddle train and test. An existing split column
    is kept unless `override`."""

    fractions: tuple[Fraction, Fraction, Fraction]
    seed: int = 0
    override: bool = False

    @classmethod
    def parse(cls, fractions: str | Sequence[float | str], seed: int = 0,
              override: bool = False) -> SplitPlan:
        return cls(parse_fractions(fractions), seed, override)


def _fraction(value: float | str) -> Fraction:
    try:
        # repr of a float is its shortest decimal, so 0.1 is 1/10 and 0.7+0.2+0.1 sums to 1.
        return Fraction(value.strip() if isinstance(value, str) else repr(float(value)))
    except (ValueError, ZeroDivisionError, TypeError):
        raise ManifestError(f"--split-fractions: {value!r} is not a number") from None


def parse_fractions(spec: str | Sequence[float | str]) -> tuple[Fraction, Fraction, Fraction]:
    """``"0.8,0.1,0.1"`` (train,val,test) or ``"0.9,0.1"`` (no test) -> three exact fractions
    that are not negative and sum to 1."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if len(items) not in (2, 3):
        raise ManifestError(f"--split-fractions {spec!r}: give train,val,test fractions "
                            "(e.g. 0.8,0.1,0.1) or train,val")
    values = [_fraction(v) for v in items] + [Fraction(0)] * (3 - len(items))
    negative = [str(v) for v in items if _fraction(v) < 0]
    if negative:
        raise ManifestError(f"--split-fractions {spec!r}: fractions cannot be negative "
                            f"({', '.join(negative)})")
    if sum(values) != 1:
        raise ManifestError(f"--split-fractions {spec!r}: fractions must sum to 1, these sum to "
                            f"{float(sum(values)):g}")
    return values[0], values[1], values[2]


def split_counts(items: int, fractions: Sequence[Fraction]) -> list[int]:
    """How many of `items` each split gets: floor(items * f), the leftovers going to the largest
    remainders (ties to the earlier split), so the counts sum to `items` exactly."""
    raw = [items * Fraction(f) for f in fractions]
    counts = [int(r) for r in raw]  # floor: every r >= 0
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[:items - sum(counts)]:
        counts[k] += 1
    return counts


def item_groups(ids: Sequence[str], media: Iterable[Sequence[str | None]]) -> list[int]:
    """Group number per row: rows that share any media cell (an image, an audio file) are one
    group, all other rows are their own group."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in media:
        first: dict[str, int] = {}
        for i, cell in enumerate(column):
            if cell:
                j = first.setdefault(cell, i)
                if j != i:
                    parent[root(i)] = root(j)
    return [root(i) for i in range(len(ids))]


def assign_splits(ids: Sequence[str], fractions: Sequence[Fraction], seed: int = 0,
                  groups: Sequence[int] | None = None) -> list[str]:
    """train/val/test per row: items ordered by a seeded hash of their smallest id, then cut
    into runs of `split_counts` items. Independent of row order; same seed, same split."""
    groups = list(range(len(ids))) if groups is None else list(groups)
    name: dict[int, str] = {}
    for g, i in zip(groups, ids, strict=True):
        if g not in name or i < name[g]:
            name[g] = i

    def key(g: int) -> tuple[bytes, str]:
        text = f"{seed}\x00{name[g]}".encode()
        return hashlib.blake2b(text, digest_size=8).digest(), name[g]

    order = sorted(name, key=key)
    split_of: dict[int, str] = {}
    start = 0
    for split, count in zip(SPLITS, split_counts(len(order), fractions), strict=True):
        for g in order[start:start + count]:
            split_of[g] = split
        start += count
    return [split_of[g] for g in groups]


def apply_splits(data: dict[str, list], plan: SplitPlan) -> list[str]:
    """Set ``data["split"]`` by `plan` (unless a split column exists and `plan.override` is
    off); returns what the summary should say about it."""
    existing = data.get("split")
    had = existing is not None and any(v is not None for v in existing)
    if had and not plan.override:
        return ["kept the existing split column (pass --override-split to reassign it)"]
    ids = data["id"]
    groups = item_groups(ids, [data[c] for c in FILE_COLUMNS if c in data])
    data["split"] = assign_splits(ids, plan.fractions, plan.seed, groups)
    items = len(set(groups))
    fractions = ",".join(f"{float(f):g}" for f in plan.fractions)
    notes = [f"{'replaced the existing split column with ' if had else ''}"
             f"splits {fractions} assigned with seed {plan.seed}"
             + (f" over {items} media items" if items != len(ids) else "")]
    empty = [s for s, f in zip(SPLITS, plan.fractions, strict=True)
             if f > 0 and s not in data["split"]]
    if empty:
        notes.append(f"{', '.join(empty)} got no rows: {items} items are too few for these "
                     "fractions")
    return notes


def single_split(split: str | None, plan: SplitPlan | None, default: str | None) -> str | None:
    """The one split a builder writes on every row, or None when `plan` assigns splits."""
    if plan is not None:
        if split is not None:
            raise ManifestError("give --split (one split for every row) or --split-fractions, "
                                "not both")
        return None
    split = default if split is None else split
    require_split(split)
    return split


def missing_media(rows: Rows, manifest_dir: Path) -> list[tuple[int, str]]:
    """(row, cell) for every image/audio cell whose file is not on disk."""
    index = FileIndex()
    missing = []
    for name in FILE_COLUMNS:
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


def split_summary(values: Sequence[str], assigned: bool) -> dict[str, int]:
    counts = Counter(values)
    # Assigned splits appear in hash order; list them train, val, test.
    return {s: counts[s] for s in SPLITS if counts[s]} if assigned else dict(counts)


def finish(rows: Rows, out: str | Path, policy: CheckPolicy, where: str,
           skipped: dict[str, int] | None = None,
           split_plan: SplitPlan | None = None) -> BuildResult:
    """Check media, assign splits (`split_plan`), validate against the manifest format, and write
    `out` atomically."""
    out = Path(out)
    skipped = {k: v for k, v in (skipped or {}).items() if v}
    dropped = apply_check(rows, manifest_dir_of(out), policy, where)
    if dropped:
        skipped["rows with missing media"] = dropped
    if not len(rows):
        raise ManifestError(f"{where}: no rows left to write")
    notes = apply_splits(rows.data, split_plan) if split_plan is not None else []
    table = validate(rows.table(), out)
    write_manifest(table, out)
    splits = (split_summary(rows.data["split"], split_plan is not None)
              if "split" in rows.data else {})
    return BuildResult(path=out, rows=len(rows), splits=splits, skipped=skipped, notes=notes)


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
