"""A plain folder of media files with same-stem ``.txt`` captions (``a/cat.jpg`` + ``a/cat.txt``).

Files are grouped by their path without extension, so ``x.jpg`` + ``x.wav`` + ``x.txt`` is one
row with image, audio and text. ids are those extension-less relative paths; rows are sorted by
them. Without any ``.txt`` the manifest has no text column; with some, every media file needs one.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignpipe.data.builders._common import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    BuildResult,
    CheckPolicy,
    Rows,
    SplitPlan,
    finish,
    listing,
    manifest_dir_of,
    media_cell,
    read_text,
    require_dir,
    single_split,
)
from alignpipe.data.builders.registry import (
    CHECK_OPTIONS,
    OUT,
    SKIP_INCOMPLETE,
    SPLIT_FRACTIONS,
    SPLIT_SEED,
    Option,
    check_of,
    register_builder,
    split_plan_of,
)
from alignpipe.data.manifest import is_blank_text
from alignpipe.util.errors import ManifestError


def _kind(name: str) -> str | None:
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    return "text" if ext == ".txt" else None


def group_files(root: Path) -> dict[str, dict[str, Path]]:
    """{relative stem: {"image"|"audio"|"text": path}}; hidden files and folders are ignored."""
    groups: dict[str, dict[str, Path]] = {}
    clashes = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            kind = _kind(name)
            if kind is None or name.startswith("."):
                continue
            path = Path(folder, name)
            key = path.relative_to(root).with_suffix("").as_posix()
            group = groups.setdefault(key, {})
            if kind in group:
                clashes.append(f"{group[kind].name} and {name} in {Path(folder)}")
            group.setdefault(kind, path)
    if clashes:
        raise ManifestError(f"{root}: files of one kind share a stem, so rows would be "
                            f"ambiguous: {listing(clashes, 5, '; ')}")
    return groups


def build_folder(source: str | Path, out: str | Path, label_from_folder: bool = False,
                 split: str | None = None, skip_incomplete: bool = False,
                 check: CheckPolicy = "error", split_plan: SplitPlan | None = None,
                 ) -> BuildResult:
    """Manifest of every image/audio file under `source`, captioned by same-stem .txt files.

    `split` writes one split on every row; `split_plan` assigns seeded train/val/test instead.
    """
    split = single_split(split, split_plan, None)
    root = require_dir(Path(source), "media folder")
    groups = {k: g for k, g in sorted(group_files(root).items()) if "image" in g or "audio" in g}
    if not groups:
        raise ManifestError(f"{root}: no image or audio files (by extension) under this folder")
    kinds = {kind for g in groups.values() for kind in g}
    columns = ["id", *[k for k in ("image", "audio", "text") if k in kinds]]
    if label_from_folder:
        unlabelled = [k for k in groups if "/" not in k]
        if unlabelled:
            raise ManifestError(f"{root}: --label-from-folder needs every file in a class "
                                f"subfolder; these are not: {listing(unlabelled)}")
        columns.append("label")
    columns += ["split"] if split else []
    rows = Rows(columns)
    manifest_dir = manifest_dir_of(out)
    uncaptioned = []
    for key, group in groups.items():
        text = read_text(group["text"], "caption").strip() if "text" in group else None
        if "text" in kinds and is_blank_text(text):
            uncaptioned.append(key)
            continue
        media = {k: media_cell(group[k], manifest_dir) for k in ("image", "audio") if k in group}
        rows.add(id=key, text=text, split=split,
                 label=key.rsplit("/", 1)[0] if label_from_folder else None, **media)
    if uncaptioned and not skip_incomplete:
        raise ManifestError(f"{root}: {len(uncaptioned)} media file(s) have no (or an empty) "
                            f"same-stem .txt caption: {listing(uncaptioned)}. Pass "
                            "--skip-incomplete to leave them out.")
    # Every cell came from the walk above, so re-listing the folders to check them finds nothing.
    return finish(rows, out, "off", str(root), {"media files without a caption":
                                                len(uncaptioned)}, split_plan)


@register_builder("folder", source="source", options=(
    Option("source", Path, positional=True, exists=True,
           help="A folder of images and/or audio files."),
    OUT,
    Option("label_from_folder", bool, False,
           "Use each file's parent folder (relative to SOURCE) as its label."),
    Option("split", str, None, "Split for every row (default: no split column)."),
    SPLIT_FRACTIONS, SPLIT_SEED, SKIP_INCOMPLETE, *CHECK_OPTIONS))
def _folder_builder(source: Path, out: Path, label_from_folder: bool, split: str | None,
                    split_fractions: str | None, split_seed: int, skip_incomplete: bool,
                    check_files: bool, skip_missing: bool, check: str | None) -> BuildResult:
    """Media files with same-stem .txt captions: x.jpg (+ x.wav) + x.txt -> one row."""
    return build_folder(source, out, label_from_folder=label_from_folder, split=split,
                        skip_incomplete=skip_incomplete,
                        check=check_of(check_files, skip_missing, check),
                        split_plan=split_plan_of(split_fractions, split_seed))
