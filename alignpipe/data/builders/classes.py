"""Class names and prompt templates shipped in ``alignpipe/resources/``, and the prompts builder.

- ``imagenet_classes.tsv``: the 1000 ILSVRC-2012 classes as ``wnid<TAB>name`` in sorted-wnid order
  (the order of torchvision/timm class indices). Names are CLIP's hand-cleaned ones from its
  ImageNet prompt-engineering notebook, kept verbatim so zero-shot numbers match CLIP and ASIF:
  that list repeats two names ("missile" for n03773504/n04008634, "sunglasses" for
  n04355933/n04356056), so there are 998 distinct labels; the wnid tells them apart, and the
  ImageNet and prompts builders write it as ``class_id``, which zero-shot keys classes by.
- ``templates_clip80.txt``: CLIP's 80 ImageNet templates; ``templates_asif7.txt``: the 7-template
  subset from the same notebook, which ASIF uses; ``templates_photo.txt``: "a photo of a {}.".
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from alignpipe.data.builders._common import BuildResult, read_text
from alignpipe.data.builders.registry import OUT, Option, register_builder
from alignpipe.util.errors import ManifestError

TEMPLATE_SETS: tuple[str, ...] = ("clip80", "asif7", "photo")
CLASS_SETS: tuple[str, ...] = ("imagenet",)


def _data_text(name: str) -> str:
    return resources.files("alignpipe").joinpath("resources", name).read_text(encoding="utf-8")


@cache
def _imagenet() -> tuple[tuple[str, str], ...]:
    lines = _data_text("imagenet_classes.tsv").splitlines()
    return tuple(tuple(line.split("\t")) for line in lines[1:] if line)  # type: ignore[misc]


def imagenet_classes() -> list[tuple[str, str]]:
    """``[(wnid, CLIP name), ...]`` for the 1000 ImageNet classes, in sorted-wnid order."""
    return list(_imagenet())


def imagenet_wnids() -> list[str]:
    return [wnid for wnid, _ in _imagenet()]


def imagenet_class_names() -> list[str]:
    return [name for _, name in _imagenet()]


def templates(name: str) -> list[str]:
    """A shipped template set: ``clip80``, ``asif7`` or ``photo``; each has one ``{}``."""
    if name not in TEMPLATE_SETS:
        raise ManifestError(f"unknown template set {name!r}; choose one of "
                            f"{', '.join(TEMPLATE_SETS)} or give a file")
    return [t for t in _data_text(f"templates_{name}.txt").splitlines() if t]


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of non-blank lines that are not ``#`` comments."""
    out = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append((number, text))
    return out


def read_class_names(spec: str | Path) -> list[str]:
    """``imagenet`` or a text file with one class name per line (``#`` lines are comments).

    A file may not repeat a name: its classes are keyed by name, so two would become one.
    """
    if str(spec) in CLASS_SETS:
        return imagenet_class_names()
    path = Path(spec)
    found = _lines(path, "class names file")
    if not found:
        raise ManifestError(f"{path}: no class names (one per line expected)")
    first: dict[str, int] = {}
    repeats = [f"line {n} repeats line {first[t]} ({t!r})" for n, t in found
               if first.setdefault(t, n) != n]
    if repeats:
        raise ManifestError(f"{path}: {'; '.join(repeats[:3])}; zero-shot keys classes by name, "
                            f"so each class needs its own")
    return [text for _, text in found]


def read_class_ids(spec: str | Path) -> list[str] | None:
    """The class ids written as ``class_id`` for a shipped class set (wnids), else None."""
    return imagenet_wnids() if str(spec) == "imagenet" else None


def read_templates(spec: str | Path) -> list[str]:
    """A shipped set name, or a file with one template per line, each with exactly one ``{}``."""
    if str(spec) in TEMPLATE_SETS:
        return templates(str(spec))
    path = Path(spec)
    if not path.exists() and "/" not in str(spec) and "." not in str(spec):
        raise ManifestError(f"unknown template set {str(spec)!r}; choose one of "
                            f"{', '.join(TEMPLATE_SETS)} or give a file")
    found = _lines(path, "templates file")
    # str.format would choke on any other brace ("{c}", "{0}") or silently drop a second "{}".
    bad = [str(n) for n, t in found if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1]
    if bad:
        raise ManifestError(f"{path}: line(s) {', '.join(bad)} must contain exactly one '{{}}' "
                            "where the class name goes, and no other braces")
    if not found:
        raise ManifestError(f"{path}: no templates (one per line expected)")
    return [t for _, t in found]


def build_prompts(out: str | Path, classes: str | Path = "imagenet",
                  template_set: str | Path = "clip80") -> BuildResult:
    """Prompts manifest: one row per (class, template) with columns id, text, label, and for
    ``imagenet`` class_id (the wnid: CLIP's names repeat "missile" and "sunglasses")."""
    import pyarrow as pa

    from alignpipe.data.manifest import write_manifest

    names = read_class_names(classes)
    class_ids = read_class_ids(classes)
    texts = read_templates(template_set)
    # ids c####-t### are unique and non-empty by construction, so there is nothing to re-read
    # and validate.
    columns: dict[str, list[str]] = {"id": [], "text": [], "label": []}
    for c, name in enumerate(names):
        for t, template in enumerate(texts):
            columns["id"].append(f"c{c:04d}-t{t:03d}")
            columns["text"].append(template.format(name))
            columns["label"].append(name)
    if class_ids is not None:
        columns["class_id"] = [i for i in class_ids for _ in texts]
    path = write_manifest(pa.table(columns), out)
    return BuildResult(path=path, rows=len(names) * len(texts), splits={})


@register_builder("prompts", options=(
    OUT,
    Option("classes", str, "imagenet",
           "'imagenet' (CLIP's 1000 names) or a file with one class name per line."),
    Option("templates", str, "clip80", "clip80, asif7, photo, or a file with one template per "
           "line ('{}' = class).", aliases=("template_set",))))
def _prompts_builder(out: Path, classes: str, templates: str) -> BuildResult:
    """Zero-shot prompts: one row (id, text, label; imagenet: class_id) per class × template."""
    return build_prompts(out, classes=classes, template_set=templates)
