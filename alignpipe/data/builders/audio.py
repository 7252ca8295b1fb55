"""Audio–caption datasets: AudioCaps and Clotho, from their released caption CSVs.

Audio files are found by indexing ``--audio ROOT`` once (recursively), so any of the common
download layouts work: flat, or split subfolders (``train/``, ``development/``, ...). When one
name exists in several folders, the one in the row's split folder wins.

- AudioCaps: ``train.csv``/``val.csv``/``test.csv`` (audiocap_id, youtube_id, start_time,
  caption); a clip is found as ``<audiocap_id>``, ``<youtube_id>``, ``Y<youtube_id>`` (AudioSet
  style) or ``<youtube_id>_<start_time>`` with any audio extension. One row per CSV row, id =
  audiocap_id; val/test clips have 5 rows that share the audio file.
- Clotho: ``clotho_captions_{development,validation,evaluation}.csv`` (file_name,
  caption_1..caption_5) -> splits train/val/test, 5 rows per clip, ids ``FILE_NAME#k`` (k from 0).
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from pathlib import Path

from alignpipe.data.builders._common import (
    AUDIO_EXTS,
    BuildResult,
    CheckPolicy,
    Rows,
    finish,
    has_ext,
    listing,
    manifest_dir_of,
    media_cell,
    read_text,
)
from alignpipe.data.builders.registry import CHECK_OPTIONS, OUT, Option, check_of, register_builder
from alignpipe.util.errors import ManifestError

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
AUDIOCAPS_FILES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
NAMINGS = ("auto", "youtube_id", "audiocap_id")


class AudioIndex:
    """Audio files under a root, looked up by stem or by file name, indexed once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_key: dict[str, list[Path]] = defaultdict(list)
        if root.is_dir():
            for folder, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    if has_ext(name, AUDIO_EXTS):
                        path = Path(folder, name)
                        self.by_key[name].append(path)
                        self.by_key[os.path.splitext(name)[0]].append(path)

    def find(self, keys: list[str], split_folders: tuple[str, ...]) -> Path | None:
        """First key that names a file; among several files, the one in a split folder."""
        for key in keys:
            paths = self.by_key.get(key)
            if not paths:
                continue
            if len(paths) == 1:
                return paths[0]
            in_split = [p for p in paths if p.parent.name in split_folders]
            if len(in_split) == 1:
                return in_split[0]
            raise ManifestError(f"{self.root}: several audio files match {key!r}: "
                                f"{listing([str(p) for p in paths], 4)}; keep one")
        return None


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a quoted CSV whose header has every `required` column."""
    # strict: a quote left open is an error, not a caption that swallows the rows after it.
    reader = csv.DictReader(io.StringIO(read_text(path, "captions CSV"), newline=""),
                            strict=True)
    start = 1  # line where the record being read starts
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        absent = [c for c in required if c not in header]
        if absent:
            raise ManifestError(f"{path}: missing column(s) {', '.join(absent)} (columns: "
                                f"{', '.join(header) or 'none'})")
        twice = [c for c in required if header.count(c) > 1]
        if twice:  # DictReader would keep the last of them without a word
            raise ManifestError(f"{path}: column {twice[0]!r} appears more than once in the "
                                f"header (columns: {', '.join(header)})")
        rows = []
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more fields than the header: the caption would lose its tail
                raise ManifestError(f"{path}:{start}: {len(header) + len(row[None])} fields "
                                    f"where the header has {len(header)}; quote a caption "
                                    "that holds a comma")
            rows.append((start, {k.strip(): (v or "").strip() for k, v in row.items()}))
            start = reader.line_num + 1
        return rows
    except csv.Error as err:
        hint = " (a quote opened in this row is never closed)" if "end of data" in str(err) \
            else ""
        raise ManifestError(f"{path}:{start}: malformed CSV ({err}){hint}") from None


def _refuse_empty(path: Path, rows: list[tuple[int, dict[str, str]]],
                  columns: tuple[str, ...]) -> None:
    empty = [f"line {n} ({c})" for n, row in rows for c in columns if not row.get(c)]
    if empty:
        raise ManifestError(f"{path}: empty cells at {listing(empty)}")


def _split_files(source: Path, patterns: dict[str, tuple[str, ...]], what: str,
                 ) -> list[tuple[str, Path]]:
    """(split, CSV) pairs: the split CSVs found in a folder, or one CSV named after its split."""
    def split_of(path: Path) -> str | None:
        stem = path.stem.lower()
        return next((s for s, names in patterns.items() if any(stem.endswith(n) for n in names)),
                    None)

    if source.is_file():
        split = split_of(source)
        if split is None:
            raise ManifestError(f"{source}: cannot tell the split from the file name; expected "
                                f"{what}")
        return [(split, source)]
    if not source.is_dir():
        raise ManifestError(f"{source}: captions folder or CSV not found")
    csvs = sorted(source.glob("*.csv"))
    found = []
    for split in patterns:
        matches = [p for p in csvs if split_of(p) == split]
        if len(matches) > 1:
            raise ManifestError(f"{source}: several {split} CSVs: "
                                f"{', '.join(p.name for p in matches)}; pass the one to use")
        found += [(split, p) for p in matches]
    if not found:
        raise ManifestError(f"{source}: no captions CSVs; expected {what}")
    return found


def _audiocaps_keys(row: dict[str, str], naming: str) -> list[str]:
    yt, cap = row["youtube_id"], row["audiocap_id"]
    start = row["start_time"].split(".")[0]
    by_youtube = [yt, f"Y{yt}", f"{yt}_{start}", f"Y{yt}_{start}"]
    if naming == "youtube_id":
        return by_youtube
    if naming == "audiocap_id":
        return [cap]
    return [cap, *by_youtube]


def build_audiocaps(source: str | Path, out: str | Path, audio: str | Path | None = None,
                    naming: str = "auto", check: CheckPolicy = "error") -> BuildResult:
    """Manifest (id, audio, text, split) from AudioCaps CSVs, splits from the CSV names."""
    if naming not in NAMINGS:
        raise ManifestError(f"unknown --naming {naming!r}; choose {', '.join(NAMINGS)}")
    source = Path(source)
    files = _split_files(source, AUDIOCAPS_FILES, "train.csv, val.csv, test.csv")
    root = Path(audio) if audio is not None else (source if source.is_dir() else source.parent)
    index = AudioIndex(root)
    rows = Rows(["id", "audio", "text", "split"])
    manifest_dir = manifest_dir_of(out)
    for split, path in files:
        table = _read_csv(path, AUDIOCAPS_COLUMNS)
        _refuse_empty(path, table, ("audiocap_id", "youtube_id", "caption"))
        for _, row in table:
            keys = _audiocaps_keys(row, naming)
            found = index.find(keys, AUDIOCAPS_FILES[split])
            # Not found: write the most common naming so --no-check-files still gives a path.
            file = found or root / f"{keys[1] if naming == 'auto' else keys[0]}.wav"
            rows.add(id=row["audiocap_id"], audio=media_cell(file, manifest_dir),
                     text=row["caption"], split=split)
    return finish(rows, out, check, f"{source} (audio under {root})")


def build_clotho(source: str | Path, out: str | Path, audio: str | Path | None = None,
                 check: CheckPolicy = "error") -> BuildResult:
    """Manifest (id, audio, text, split) from Clotho's captions CSVs: 5 rows per clip."""
    source = Path(source)
    patterns = {split: (f"captions_{name}",) for name, split in CLOTHO_SPLITS.items()}
    files = _split_files(source, patterns, "clotho_captions_{development,validation,evaluation}"
                         ".csv")
    root = Path(audio) if audio is not None else (source if source.is_dir() else source.parent)
    index = AudioIndex(root)
    folder_of = {split: name for name, split in CLOTHO_SPLITS.items()}
    columns = tuple(f"caption_{k}" for k in range(1, 6))
    rows = Rows(["id", "audio", "text", "split"])
    manifest_dir = manifest_dir_of(out)
    for split, path in files:
        table = _read_csv(path, ("file_name", *columns))
        _refuse_empty(path, table, ("file_name", *columns))
        for _, row in table:
            name = row["file_name"]
            found = index.find([name], (folder_of[split],))
            file = found or root / folder_of[split] / name
            cell = media_cell(file, manifest_dir)
            for k, column in enumerate(columns):
                rows.add(id=f"{name}#{k}", audio=cell, text=row[column], split=split)
    return finish(rows, out, check, f"{source} (audio under {root})")


_AUDIO_ROOT = Option("audio", Path, None, exists=True, help="Folder holding the audio files, "
                     "searched recursively (default: SOURCE's folder).")


@register_builder("audiocaps", source="source", where_to_get="AudioCaps CSVs "
                  "(github.com/cdjkim/audiocaps) and the downloaded clips", options=(
    Option("source", Path, positional=True, exists=True,
           help="Folder with train.csv/val.csv/test.csv, or one of them."),
    OUT, _AUDIO_ROOT,
    Option("naming", str, "auto", "How clips are named: auto, youtube_id (also Y<id>, "
                                  "<id>_<start>) or audiocap_id."),
    *CHECK_OPTIONS))
def _audiocaps_builder(source: Path, out: Path, audio: Path | None, naming: str,
                       check_files: bool, skip_missing: bool, check: str | None) -> BuildResult:
    """AudioCaps: one row per caption (id = audiocap_id), split from the CSV's name."""
    return build_audiocaps(source, out, audio=audio, naming=naming,
                           check=check_of(check_files, skip_missing, check))


@register_builder("clotho", source="source",
                  where_to_get="Clotho v2 captions CSVs and audio (zenodo)", options=(
    Option("source", Path, positional=True, exists=True, help="Folder with "
           "clotho_captions_{development,validation,evaluation}.csv, or one."),
    OUT, _AUDIO_ROOT, *CHECK_OPTIONS))
def _clotho_builder(source: Path, out: Path, audio: Path | None, check_files: bool,
                    skip_missing: bool, check: str | None) -> BuildResult:
    """Clotho: 5 rows per clip; development/validation/evaluation -> train/val/test."""
    return build_clotho(source, out, audio=audio,
                        check=check_of(check_files, skip_missing, check))
