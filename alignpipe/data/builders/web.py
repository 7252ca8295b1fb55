"""Web-scale image–text pairs (CC3M, CC12M, anything img2dataset downloads), in three layouts:

- a TSV/CSV with a header naming a caption column and an image-path column (open_clip's
  ``--csv-img-key filepath --csv-caption-key title`` format and most download reports);
- img2dataset's ``files`` output: ``00000/000000000.jpg`` + ``.txt`` (+ ``.json``), with the
  per-shard ``00000.parquet`` used for captions when present (one read instead of a file per row);
- img2dataset's ``webdataset`` output: tar shards read once each, sequentially, in streaming mode;
  image cells are ``shard.tar::member.jpg`` and a tar's rows are contiguous, in member order.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from alignpipe.data.builders._common import (
    IMAGE_EXTS,
    BuildResult,
    CheckPolicy,
    Rows,
    SplitPlan,
    archive_cell,
    finish,
    has_ext,
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
    SPLIT,
    SPLIT_FRACTIONS,
    SPLIT_SEED,
    Option,
    check_of,
    register_builder,
    split_plan_of,
)
from alignpipe.data.manifest import is_blank_text
from alignpipe.util.errors import ManifestError

CAPTION_COLUMNS = ("caption", "title", "text", "TEXT")
# Header names a caption table may give its image-path column, tried in this order.
PATH_HEADERS = ("filepath", "image", "image_path", "path", "file", "filename")
BRACE = re.compile(r"\{([^{}]*)\}")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


# ---- TSV / CSV ---------------------------------------------------------------------------------
def _pick_column(header: list[str], given: str | None, candidates: tuple[str, ...], what: str,
                 where: Path) -> int:
    if given is not None:
        if given not in header:
            raise ManifestError(f"{where}: no {what} column {given!r} (columns: "
                                f"{', '.join(header)})")
        return _only_column(header, given, where)
    for name in candidates:
        if name in header:
            return _only_column(header, name, where)
    raise ManifestError(f"{where}: cannot tell which column holds the {what} (columns: "
                        f"{', '.join(header)}); name it with --{what}-column. The first line "
                        "must be a header naming the columns")


def _only_column(header: list[str], name: str, where: Path) -> int:
    """Index of `name` in `header`; a name that is there twice would read one of two columns."""
    if header.count(name) > 1:
        raise ManifestError(f"{where}: column {name!r} appears more than once in the header "
                            f"(columns: {', '.join(header)})")
    return header.index(name)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a TSV (no quoting, as CC3M's files are) or a quoted CSV; a quote
    left open (which would swallow the rows after it into one caption) is an error."""
    handle = open(path, newline="", encoding="utf-8-sig")
    start = 1  # line where the record being read starts
    try:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(handle, strict=True)
        else:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as err:
        hint = " (a quote opened in this row is never closed)" if "end of data" in str(err) \
            else ""
        raise ManifestError(f"{path}:{start}: malformed CSV: {err}{hint}") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text near line {start} ({err.reason})") from None
    finally:
        handle.close()


def build_caption_table(source: str | Path, out: str | Path, caption_column: str | None = None,
                        path_column: str | None = None, id_column: str | None = None,
                        images: str | Path | None = None, split: str | None = None,
                        skip_incomplete: bool = False, check: CheckPolicy = "error",
                        split_plan: SplitPlan | None = None) -> BuildResult:
    """Manifest from a TSV/CSV of downloaded files; paths relative to `images` or the file.
    Every row gets `split` (default train), or `split_plan` assigns seeded splits."""
    source = Path(source)
    split = single_split(split, split_plan, "train")
    if not source.is_file():
        raise ManifestError(f"{source}: caption table not found")
    lines = _csv_rows(source)
    try:
        _, header = next(lines)
    except StopIteration:
        raise ManifestError(f"{source}: file is empty") from None
    header = [h.strip() for h in header]
    cap = _pick_column(header, caption_column, CAPTION_COLUMNS, "caption", source)
    pth = _pick_column(header, path_column, PATH_HEADERS, "path", source)
    key = _pick_column(header, id_column, (), "id", source) if id_column else None
    status = _only_column(header, "status", source) if "status" in header else None
    root = Path(images) if images is not None else source.parent
    rows = Rows(["id", "image", "text", *(["split"] if split else [])])
    manifest_dir = manifest_dir_of(out)
    incomplete, failed = [], 0
    for index, (number, fields) in enumerate(lines):
        if len(fields) > len(header):  # the cells after a stray delimiter would be misread
            raise ManifestError(f"{source}:{number}: {len(fields)} fields where the header has "
                                f"{len(header)}; a caption holding the delimiter must be quoted "
                                "(CSV) or the delimiter removed (TSV)")
        if status is not None and _field(fields, status) not in ("", "success"):
            failed += 1  # img2dataset keeps failed downloads in its table with their status
            continue
        text, file = _field(fields, cap), _field(fields, pth)
        if is_blank_text(text) or not file:
            incomplete.append(f"line {number}")
            continue
        rows.add(id=_field(fields, key) if key is not None else f"{index:09d}",
                 image=media_cell(root / file, manifest_dir), text=text, split=split)
    _refuse_incomplete(incomplete, skip_incomplete, f"{source}: rows with an empty caption or "
                       "path")
    skipped = {"failed downloads": failed, "rows with an empty caption or path": len(incomplete)}
    return finish(rows, out, check, f"{source} (images under {root})", skipped, split_plan)


def _field(fields: list[str], i: int) -> str:
    return fields[i].strip() if i < len(fields) else ""


def _refuse_incomplete(found: list[str], skip: bool, what: str) -> None:
    if found and not skip:
        raise ManifestError(f"{what}: {len(found)} found: {listing(found)}. Pass "
                            "--skip-incomplete to leave them out.")


# ---- img2dataset "files" folder ----------------------------------------------------------------
def _shard_captions(parquet: Path) -> dict[str, str]:
    """key -> caption from img2dataset's per-shard parquet, or {} if it is absent or unusual."""
    if not parquet.is_file():
        return {}
    try:
        table = pq.read_table(parquet, columns=["key", "caption"])
    except Exception:  # noqa: BLE001 - any unreadable parquet just means: read the .txt files
        return {}
    return {str(k): c for k, c in zip(table.column("key").to_pylist(),
                                      table.column("caption").to_pylist(), strict=True) if c}


def _sidecar_caption(folder: Path, stem: str, names: set[str]) -> str | None:
    if f"{stem}.txt" in names:
        return read_text(folder / f"{stem}.txt", "caption file").strip() or None
    if f"{stem}.json" in names:
        try:
            caption = json.loads(read_text(folder / f"{stem}.json", "metadata")).get("caption")
        except (json.JSONDecodeError, AttributeError):
            return None
        return caption.strip() if isinstance(caption, str) and caption.strip() else None
    return None


def build_img2dataset(source: str | Path, out: str | Path, split: str | None = None,
                      skip_incomplete: bool = False, check: CheckPolicy = "error",
                      split_plan: SplitPlan | None = None) -> BuildResult:
    """Manifest from img2dataset's files layout; rows by shard folder, then by key."""
    split = single_split(split, split_plan, "train")
    source = require_dir(Path(source), "img2dataset output folder")
    shards = sorted((p for p in source.iterdir() if p.is_dir() and p.name.isdigit()),
                    key=lambda p: (int(p.name), p.name))
    if not shards:
        hint = " (it holds .tar shards: use `alignpipe manifest webdataset`)" \
            if any(source.glob("*.tar")) else ""
        raise ManifestError(f"{source}: no numbered shard folders (00000/, 00001/, ...) as "
                            f"img2dataset writes them{hint}")
    rows = Rows(["id", "image", "text", *(["split"] if split else [])])
    manifest_dir = manifest_dir_of(out)
    incomplete: list[str] = []
    for shard in shards:
        names = set(os.listdir(shard))
        captions = _shard_captions(source / f"{shard.name}.parquet")
        for name in sorted(n for n in names if has_ext(n, IMAGE_EXTS)):
            stem = os.path.splitext(name)[0]
            text = captions.get(stem) or _sidecar_caption(shard, stem, names)
            if is_blank_text(text):
                incomplete.append(f"{shard.name}/{name}")
                continue
            rows.add(id=stem, image=media_cell(shard / name, manifest_dir), text=text.strip(),
                     split=split)
    _refuse_incomplete(incomplete, skip_incomplete, f"{source}: images with no caption (.txt, "
                       ".json or shard parquet)")
    # Every cell came from a shard listing above, so re-listing the shards finds nothing missing.
    return finish(rows, out, "off", str(source), {"images with no caption": len(incomplete)},
                  split_plan)


# ---- webdataset tars ---------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{00000..00099}`` (zero-padded ranges) and ``{a,b}``."""
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ManifestError(f"{pattern}: cannot expand {{{body}}}; use {{00000..00099}} or {{a,b}}")
    return [out for option in options for out in expand_braces(head + option + tail)]


def shard_paths(spec: str | Path, check: CheckPolicy) -> tuple[list[Path], int]:
    """Tars named by a brace pattern, a folder (its *.tar, sorted) or one file; + missing count."""
    text = str(spec)
    if BRACE.search(text):
        paths = [Path(p) for p in expand_braces(text)]
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob("*.tar"))
        if not paths:
            raise ManifestError(f"{text}: no .tar shards in this folder")
    else:
        paths = [Path(text)]
    is_file = [p.is_file() for p in paths]  # one stat per shard
    present = [p for p, ok in zip(paths, is_file, strict=True) if ok]
    missing = [str(p) for p, ok in zip(paths, is_file, strict=True) if not ok]
    if missing and check != "skip":
        raise ManifestError(f"{text}: {len(missing)} of {len(paths)} shard(s) missing: "
                            f"{listing(missing)}. Tars must exist to list their "
                            "members; pass --skip-missing to leave missing shards out")
    return present, len(missing)


def _sample_key(member: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    folder, base = os.path.split(member)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _refuse_compressed(tar: Path) -> None:
    """Stage one reads members by byte offset, which a compressed tar does not have."""
    try:
        with open(tar, "rb") as handle:
            head = handle.read(6)
    except OSError as err:
        raise ManifestError(f"{tar}: cannot read tar shard ({err})") from None
    if any(head.startswith(magic) for magic in COMPRESSED_MAGIC):
        raise ManifestError(f"{tar}: compressed tar; shards must be plain .tar (as img2dataset "
                            "writes them) so members can be read by offset")


def read_shard(tar: Path) -> list[tuple[str, str | None, str | None]]:
    """(key, image member, caption) per sample, in member order, reading the tar once."""
    _refuse_compressed(tar)
    samples: dict[str, list] = {}
    try:
        with tarfile.open(tar, mode="r|") as stream:
            for member in stream:
                if not member.isfile():
                    continue
                key, ext = _sample_key(member.name)
                sample = samples.setdefault(key, [key, None, None])
                if sample[1] is None and f".{ext}" in IMAGE_EXTS:
                    sample[1] = member.name
                elif ext == "txt":
                    sample[2] = stream.extractfile(member).read().decode("utf-8").strip()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ManifestError(f"{tar}: unreadable tar shard ({err})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{tar}: a .txt member is not UTF-8") from None
    return [tuple(s) for s in samples.values()]  # type: ignore[misc]


def build_webdataset(shards: str | Path, out: str | Path, split: str | None = None,
                     skip_incomplete: bool = False, check: CheckPolicy = "error",
                     split_plan: SplitPlan | None = None) -> BuildResult:
    """Manifest from webdataset tars: image ``shard.tar::member``, text from the .txt member."""
    split = single_split(split, split_plan, "train")
    tars, missing = shard_paths(shards, check)
    if not tars:
        raise ManifestError(f"{shards}: no tar shards to read")
    rows = Rows(["id", "image", "text", *(["split"] if split else [])])
    manifest_dir = manifest_dir_of(out)
    incomplete: list[str] = []
    first_tar: dict[str, Path] = {}
    for tar in tars:
        for key, image, text in read_shard(tar):
            if image is None or is_blank_text(text):
                incomplete.append(f"{tar.name}:{key}")
                continue
            if key in first_tar:
                raise ManifestError(f"sample key {key!r} appears in both {first_tar[key]} and "
                                    f"{tar}; ids must be unique across shards")
            first_tar[key] = tar
            rows.add(id=key, image=archive_cell(tar, image, manifest_dir), text=text, split=split)
    _refuse_incomplete(incomplete, skip_incomplete, f"{shards}: samples without an image or a "
                       ".txt caption")
    skipped = {"missing shards": missing, "samples without image or caption": len(incomplete)}
    return finish(rows, out, check, str(shards), skipped, split_plan)


def build_cc3m(source: str | Path, out: str | Path, caption_column: str | None = None,
               path_column: str | None = None, id_column: str | None = None,
               images: str | Path | None = None, split: str | None = None,
               skip_incomplete: bool = False, check: CheckPolicy = "error",
               split_plan: SplitPlan | None = None) -> BuildResult:
    """CC3M/CC12M: a TSV/CSV file of downloaded files, or an img2dataset files folder."""
    if Path(source).is_dir():
        if caption_column or path_column or id_column or images:
            raise ManifestError(f"{source}: is an img2dataset folder; the column and --images "
                                "options only apply to a TSV/CSV source")
        return build_img2dataset(source, out, split, skip_incomplete, check, split_plan)
    return build_caption_table(source, out, caption_column, path_column, id_column, images,
                               split, skip_incomplete, check, split_plan)


_CC3M_OPTIONS = (
    Option("source", Path, positional=True, exists=True, help="A TSV/CSV with a header (caption "
           "+ image path columns), or img2dataset's output folder (00000/000000000.jpg + .txt)."),
    OUT,
    Option("caption_column", str, None, "TSV: caption column (default: caption, title or text)."),
    Option("path_column", str, None, "TSV: image path column (default: filepath, image, "
                                     "image_path, path, file, filename)."),
    Option("id_column", str, None, "TSV: id column (default: the 0-based data row, 9 digits)."),
    Option("images", Path, None, exists=True,
           help="TSV: folder the paths are relative to (default: the TSV's folder)."),
    SPLIT, SPLIT_FRACTIONS, SPLIT_SEED, SKIP_INCOMPLETE, *CHECK_OPTIONS)


def _cc3m_builder(source: Path, out: Path, caption_column: str | None, path_column: str | None,
                  id_column: str | None, images: Path | None, split: str | None,
                  split_fractions: str | None, split_seed: int, skip_incomplete: bool,
                  check_files: bool, skip_missing: bool, check: str | None) -> BuildResult:
    """CC3M / CC12M (or any downloaded image-caption table): id, image, text, split."""
    return build_cc3m(source, out, caption_column=caption_column, path_column=path_column,
                      id_column=id_column, images=images, split=split,
                      skip_incomplete=skip_incomplete,
                      check=check_of(check_files, skip_missing, check),
                      split_plan=split_plan_of(split_fractions, split_seed))


register_builder("cc3m", options=_CC3M_OPTIONS, source="source",
                 where_to_get="CC3M/CC12M downloaded with img2dataset (a TSV of caption + file, "
                              "or its output folder)")(_cc3m_builder)
register_builder("cc12m", options=_CC3M_OPTIONS, source="source", cli=False,
                 where_to_get="CC12M downloaded with img2dataset")(_cc3m_builder)


@register_builder("webdataset", source="shards", where_to_get="img2dataset webdataset tars, e.g. "
                  "/data/cc3m/{00000..00331}.tar", options=(
    Option("shards", str, positional=True, aliases=("source",), help="'DIR/{00000..00099}.tar' "
           "(quote it), a folder of .tar, or one .tar."),
    OUT, SPLIT, SPLIT_FRACTIONS, SPLIT_SEED, SKIP_INCOMPLETE, *CHECK_OPTIONS))
def _webdataset_builder(shards: str, out: Path, split: str | None, split_fractions: str | None,
                        split_seed: int, skip_incomplete: bool, check_files: bool,
                        skip_missing: bool, check: str | None) -> BuildResult:
    """img2dataset tar shards, each read once: image 'shard.tar::key.jpg', text from key.txt."""
    return build_webdataset(shards, out, split=split, skip_incomplete=skip_incomplete,
                            check=check_of(check_files, skip_missing, check),
                            split_plan=split_plan_of(split_fractions, split_seed))
