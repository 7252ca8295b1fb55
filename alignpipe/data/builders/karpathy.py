"""COCO and Flickr30K captions from Karpathy's split files (``dataset_coco.json``,
``dataset_flickr30k.json``), the splits every retrieval paper reports on.

Each image gives `captions_per_image` rows (5, the protocol) that share its image path; ids are
``FILENAME#k`` (k from 0, Flickr30K's own token-file convention). ``restval`` counts as train.
COCO images live at ``IMAGES/filepath/filename`` (e.g. ``val2014/COCO_val2014_...jpg``);
Flickr30K images at ``IMAGES/filename``.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignpipe.data.builders._common import (
    BuildResult,
    CheckPolicy,
    Rows,
    finish,
    listing,
    manifest_dir_of,
    media_cell,
    read_text,
)
from alignpipe.data.builders.registry import CHECK_OPTIONS, OUT, Option, check_of, register_builder
from alignpipe.util.errors import ManifestError

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_DATASETS = ("coco", "flickr30k", "flickr8k")


def load_karpathy(path: Path) -> tuple[str | None, list]:
    """(declared dataset, ``images`` list) of a Karpathy split file; JSON errors name the line."""
    text = read_text(path, "Karpathy split file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{path}: expected a JSON object with an 'images' list "
                            "(Karpathy's dataset_*.json)")
    declared = data.get("dataset")
    return (declared if isinstance(declared, str) else None), data["images"]


def _captions(entry: dict) -> list[str] | None:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        return None
    out = []
    for s in sentences:
        if not isinstance(s, dict):
            return None
        raw = s.get("raw")
        # Some re-exports drop 'raw'; the tokens are the same caption, lower-cased.
        text = raw if isinstance(raw, str) else " ".join(s.get("tokens") or [])
        out.append(text.strip())
    return out


def _entry_problem(entry: object, need_filepath: bool, per_image: int) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    keys = {"filename": str, "split": str, "sentences": list}
    if need_filepath:
        keys["filepath"] = str
    # A wrong type (a list as filename, a number as split) would crash later with a TypeError.
    absent = [k for k, kind in keys.items() if not isinstance(entry.get(k), kind)
              or entry.get(k) == ""]
    if absent:
        return f"has no {', '.join(repr(k) for k in absent)}"
    if entry["split"] not in KARPATHY_SPLITS:
        return f"has split {entry['split']!r} (expected {', '.join(KARPATHY_SPLITS)})"
    captions = _captions(entry)
    if captions is None:
        return "has malformed 'sentences' (expected objects with 'raw' or 'tokens')"
    non_empty = sum(1 for c in captions if c)
    if non_empty < per_image:
        return f"has {non_empty} non-empty captions, fewer than {per_image}"
    return None


def build_karpathy(source: str | Path, out: str | Path, dataset: str,
                   images: str | Path | None = None, captions_per_image: int = 5,
                   check: CheckPolicy = "error") -> BuildResult:
    """Manifest (id, image, text, split) from a Karpathy split file for `dataset`."""
    source = Path(source)
    if dataset not in KARPATHY_DATASETS:
        raise ManifestError(f"unknown Karpathy dataset {dataset!r}")
    if captions_per_image < 1:
        raise ManifestError("--captions-per-image must be at least 1")
    declared, entries = load_karpathy(source)
    if declared and declared != dataset:
        raise ManifestError(f"{source}: this file is Karpathy's {declared!r} split, not "
                            f"{dataset!r}; use `alignpipe manifest {declared}`")
    need_filepath = dataset == "coco"
    problems = []
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry, need_filepath, captions_per_image)
        if problem:
            name = entry.get("filename", "?") if isinstance(entry, dict) else "?"
            problems.append(f"images[{i}] ({name}) {problem}")
    if problems:
        raise ManifestError(f"{source}: {len(problems)} malformed image entr"
                            f"{'y' if len(problems) == 1 else 'ies'}: {listing(problems, 5, '; ')}")
    root = Path(images) if images is not None else source.parent
    rows = Rows(["id", "image", "text", "split"])
    manifest_dir = manifest_dir_of(out)
    for entry in entries:
        relative = Path(entry["filepath"], entry["filename"]) if need_filepath \
            else Path(entry["filename"])
        cell = media_cell(root / relative, manifest_dir)
        captions = [c for c in _captions(entry) or [] if c][:captions_per_image]
        for k, text in enumerate(captions):
            rows.add(id=f"{entry['filename']}#{k}", image=cell, text=text,
                     split=KARPATHY_SPLITS[entry["split"]])
    return finish(rows, out, check, f"{source} (images under {root})")


def _karpathy_options(json_name: str) -> tuple[Option, ...]:
    return (Option("source", Path, positional=True, exists=True,
                   help=f"Karpathy's {json_name}."),
            OUT,
            Option("images", Path, None, exists=True,
                   help="Image root (default: the JSON's folder)."),
            Option("captions_per_image", int, 5, "Captions kept per image, in file order."),
            *CHECK_OPTIONS)


@register_builder("coco", options=_karpathy_options("dataset_coco.json"), source="source",
                  where_to_get="COCO 2014 images (cocodataset.org) and Karpathy's "
                               "dataset_coco.json")
def _coco_builder(source: Path, out: Path, images: Path | None, captions_per_image: int,
                  check_files: bool, skip_missing: bool, check: str | None) -> BuildResult:
    """COCO Karpathy splits: 5 rows per image at IMAGES/filepath/filename; restval -> train."""
    return build_karpathy(source, out, "coco", images=images,
                          captions_per_image=captions_per_image,
                          check=check_of(check_files, skip_missing, check))


@register_builder("flickr30k", options=_karpathy_options("dataset_flickr30k.json"),
                  source="source", where_to_get="Flickr30K images (by request from its authors) "
                                                "and dataset_flickr30k.json")
def _flickr30k_builder(source: Path, out: Path, images: Path | None, captions_per_image: int,
                       check_files: bool, skip_missing: bool, check: str | None) -> BuildResult:
    """Flickr30K Karpathy splits: 5 rows per image at IMAGES/filename."""
    return build_karpathy(source, out, "flickr30k", images=images,
                          captions_per_image=captions_per_image,
                          check=check_of(check_files, skip_missing, check))
