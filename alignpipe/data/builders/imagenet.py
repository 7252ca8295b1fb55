"""ImageNet (ILSVRC-2012) validation images, from either standard layout.

1. Class subfolders: ``val/n01440764/ILSVRC2012_val_00000293.JPEG`` (what most prep scripts make).
2. A flat folder plus ``--labels FILE``, which is either
   - the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line i is the label of
     ``ILSVRC2012_val_{i:08d}.JPEG`` as a 1-based ILSVRC2012_ID. Those IDs follow the devkit's own
     class order (1 = n02119789 kit fox), *not* sorted wnids, so they are mapped through the
     devkit's ``meta.mat`` (found next to the labels file, or ``--devkit-meta``; a
     ``map_clsloc.txt``-style ``wnid id name`` file also works), or
   - ``filename<TAB|comma|space>label`` lines, where label is a wnid or a 0-based index in
     sorted-wnid order (torchvision/timm/caffe ``val.txt`` order). A header line and
     extension-less file names (Kaggle's ``LOC_val_solution.csv``) are accepted.

Rows are sorted by file name, so both layouts give the same manifest (devkit order for val).
``label`` is CLIP's class name, which repeats for two pairs of classes ("missile",
"sunglasses"); ``class_id`` is the wnid, which zero-shot keys classes by when the prompts
manifest has one too (``manifest prompts --classes imagenet`` writes it), so all 1000 classes
are scored apart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from alignpipe.data.builders._common import (
    IMAGE_EXTS,
    BuildResult,
    CheckPolicy,
    Rows,
    finish,
    has_ext,
    listing,
    manifest_dir_of,
    media_cell,
    read_text,
    require_dir,
)
from alignpipe.data.builders.classes import imagenet_classes, imagenet_wnids
from alignpipe.data.builders.registry import CHECK_OPTIONS, OUT, Option, check_of, register_builder
from alignpipe.util.errors import ManifestError

WNID = re.compile(r"n\d{8}")
DEVKIT_FILE = "ILSVRC2012_val_{:08d}.JPEG"


def build_imagenet(source: str | Path, out: str | Path, labels: str | Path | None = None,
                   devkit_meta: str | Path | None = None,
                   check: CheckPolicy = "error") -> BuildResult:
    """Manifest of ImageNet val: id (file stem), image, label (CLIP name), class_id (wnid),
    split=test."""
    source = require_dir(Path(source), "ImageNet image folder")
    skipped: dict[str, int] = {}
    if labels is None:
        items = _class_folder_items(_class_folder_root(source))
        check = "off"  # every path came from a folder listing, so checking finds nothing missing
    else:
        items, skipped = _labelled_items(source, Path(labels), devkit_meta)
    names = dict(imagenet_classes())
    rows = Rows(["id", "image", "label", "class_id", "split"])
    manifest_dir = manifest_dir_of(out)
    for path, wnid in sorted(items, key=lambda item: (item[0].name, str(item[0]))):
        rows.add(id=path.stem, image=media_cell(path, manifest_dir), label=names[wnid],
                 class_id=wnid, split="test")
    return finish(rows, out, check, str(source), skipped)


def _class_folder_root(source: Path) -> Path:
    """`source` if it holds wnid folders; its ``val/`` if that does (an ImageNet root)."""
    for candidate in (source, source / "val"):
        if candidate.is_dir() and any(WNID.fullmatch(d.name) for d in candidate.iterdir()
                                      if d.is_dir()):
            return candidate
    raise ManifestError(
        f"{source}: no class subfolders like n01440764/ here (nor under val/); for a flat folder "
        "of images pass --labels with ILSVRC2012_validation_ground_truth.txt or a "
        "'filename label' file")


def _class_folder_items(root: Path) -> list[tuple[Path, str]]:
    known = set(imagenet_wnids())
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    strays = [p.name for p in entries if p.is_file() and has_ext(p, IMAGE_EXTS)]
    if strays:
        raise ManifestError(f"{root}: {len(strays)} image(s) lie outside any class folder: "
                            f"{listing(strays)}")
    folders = [p for p in entries if p.is_dir()]
    unknown = [p.name for p in folders if p.name not in known]
    if unknown:
        raise ManifestError(f"{root}: folder(s) {listing(unknown)} are not ImageNet-1k wnids "
                            "(expected names like n01440764)")
    items: list[tuple[Path, str]] = []
    for folder in folders:
        items += [(folder / name, folder.name) for name in sorted(os.listdir(folder))
                  if has_ext(name, IMAGE_EXTS)]
    _refuse_repeated_stems(items)
    if not items:
        raise ManifestError(f"{root}: the class folders hold no images")
    return items


def _refuse_repeated_stems(items: list[tuple[Path, str]]) -> None:
    seen: dict[str, Path] = {}
    clashes = []
    for path, _ in items:
        if path.stem in seen:
            clashes.append(f"{seen[path.stem]} and {path}")
        seen.setdefault(path.stem, path)
    if clashes:
        raise ManifestError(f"the same file name appears in several class folders, so ids would "
                            f"repeat: {listing(clashes, 5, '; ')}")


def _labelled_items(folder: Path, labels: Path, devkit_meta: str | Path | None,
                    ) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    lines = [(n, line.strip()) for n, line in
             enumerate(read_text(labels, "labels file").splitlines(), start=1) if line.strip()]
    if not lines:
        raise ManifestError(f"{labels}: labels file is empty")
    if all(line.isdigit() for _, line in lines):
        pairs = _devkit_pairs(labels, lines, devkit_meta)
    else:
        pairs = _pair_lines(labels, lines)
    return _match_files(folder, labels, pairs)


def _devkit_pairs(labels: Path, lines: list[tuple[int, str]], devkit_meta: str | Path | None,
                  ) -> list[tuple[int, str, str]]:
    """(line, file name, wnid) from the devkit ground truth: line i labels image i."""
    meta = Path(devkit_meta) if devkit_meta else labels.parent / "meta.mat"
    if not meta.exists():
        raise ManifestError(
            f"{labels}: looks like the devkit's ground truth (one ILSVRC2012_ID per line); those "
            f"IDs are in the devkit's class order, which only its meta.mat maps to wnids, and "
            f"{meta} does not exist. Pass --devkit-meta PATH/TO/meta.mat")
    by_id = devkit_id_to_wnid(meta)
    pairs, bad = [], []
    for number, text in lines:
        wnid = by_id.get(int(text))
        if wnid is None:
            bad.append(f"line {number} ({text})")
        pairs.append((number, DEVKIT_FILE.format(number), wnid or ""))
    if bad:
        raise ManifestError(f"{labels}: ILSVRC2012_IDs outside 1..1000 at {listing(bad)}")
    return pairs


def devkit_id_to_wnid(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the 1000 leaf classes, from meta.mat or a map_clsloc.txt."""
    mapping = _read_meta_mat(meta) if meta.suffix == ".mat" else _read_map_clsloc(meta)
    known = set(imagenet_wnids())
    if sorted(mapping) != list(range(1, 1001)) or set(mapping.values()) != known:
        raise ManifestError(f"{meta}: does not map ILSVRC2012_IDs 1..1000 one-to-one onto the "
                            f"ImageNet-1k wnids (found {len(mapping)} ids)")
    return mapping


def _read_meta_mat(meta: Path) -> dict[int, str]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ManifestError(f"{meta}: reading the devkit's meta.mat needs scipy "
                            "(pip install scipy), or pass a 'wnid id name' text file") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        ids, wnids, children = (synsets[k] for k in ("ILSVRC2012_ID", "WNID", "num_children"))
    except (KeyError, ValueError, OSError, TypeError) as err:
        raise ManifestError(f"{meta}: not the ImageNet devkit's meta.mat ({err})") from None
    # Only leaves are classes; the other 860 synsets are WordNet ancestors.
    return {int(i): str(w) for i, w, c in zip(ids, wnids, children, strict=True) if int(c) == 0}


def _read_map_clsloc(meta: Path) -> dict[int, str]:
    mapping = {}
    for number, line in enumerate(read_text(meta, "class map").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not WNID.fullmatch(fields[0]) or not fields[1].isdigit():
            raise ManifestError(f"{meta}:{number}: expected 'wnid id [name]', got {line!r}")
        mapping[int(fields[1])] = fields[0]
    return mapping


def _split_fields(line: str) -> list[str]:
    for sep in ("\t", ","):
        if sep in line:
            return [f.strip() for f in line.split(sep)]
    return line.split()


def _pair_lines(labels: Path, lines: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """(line, file name, wnid) from ``filename label`` lines; label = wnid or 0-based index."""
    wnids = imagenet_wnids()
    known = set(wnids)
    pairs, bad = [], []
    for number, line in lines:
        fields = _split_fields(line)
        token = fields[1].split()[0] if len(fields) > 1 and fields[1].split() else ""
        if token in known:
            pairs.append((number, fields[0], token))
        elif token.isdigit() and int(token) < len(wnids):
            pairs.append((number, fields[0], wnids[int(token)]))
        elif number != lines[0][0]:  # the first line may be a header
            bad.append(f"line {number} ({line[:60]!r})")
    if bad:
        raise ManifestError(
            f"{labels}: expected 'filename<TAB|,|space>label' with an ImageNet-1k wnid or a "
            f"0-based index 0..999 (sorted-wnid order) as label; bad {listing(bad)}")
    return pairs


def _match_files(folder: Path, labels: Path, pairs: list[tuple[int, str, str]],
                 ) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    """Pair labels with image files by name, or by stem when the labels omit the extension."""
    files = sorted(n for n in os.listdir(folder) if has_ext(n, IMAGE_EXTS))
    by_name = {n: n for n in files}
    by_stem = {os.path.splitext(n)[0]: n for n in files}
    items, used, repeats = [], set(), []
    for number, name, wnid in pairs:
        found = by_name.get(name) or by_stem.get(name) or name
        if found in used:
            repeats.append(f"line {number} ({name})")
        used.add(found)
        items.append((folder / found, wnid))
    if repeats:
        raise ManifestError(f"{labels}: image(s) labelled more than once: {listing(repeats)}")
    unlabelled = len(set(files) - used)
    return items, {"images in the folder with no label": unlabelled}


@register_builder("imagenet", source="source", where_to_get="ImageNet ILSVRC2012 validation "
                  "images (image-net.org, after registration)", options=(
    Option("source", Path, positional=True, exists=True, help="val/ with class subfolders "
           "(n01440764/...), or a flat folder with --labels."),
    OUT,
    Option("labels", Path, None, exists=True, help="Flat folder only: the devkit's "
           "ILSVRC2012_validation_ground_truth.txt, or 'filename<TAB|,|space>label' lines "
           "(label = wnid or 0-based sorted-wnid index)."),
    Option("devkit_meta", Path, None, exists=True, help="The devkit's data/meta.mat (default: "
           "next to --labels), mapping its 1-based ILSVRC2012_IDs to wnids."),
    *CHECK_OPTIONS))
def _imagenet_builder(source: Path, out: Path, labels: Path | None, devkit_meta: Path | None,
                      check_files: bool, skip_missing: bool, check: str | None) -> BuildResult:
    """ImageNet val: id, image, label (CLIP class name), class_id (wnid), split=test."""
    return build_imagenet(source, out, labels=labels, devkit_meta=devkit_meta,
                          check=check_of(check_files, skip_missing, check))
