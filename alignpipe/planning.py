"""What a pipeline needs before it starts: making manifests, and checking inputs exist.

`alignpipe run` calls these before any work so that a missing dataset or weights file is one
message naming every missing input, not a traceback half-way through.
"""

from __future__ import annotations

import inspect
import os
import socket
from pathlib import Path

from alignpipe.errors import AlignpipeError

# make.kind -> (builder, option that holds the main source, other options that are paths)
BUILDERS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "toy": ("toy", None, ()),
    "prompts": ("build_prompts", None, ()),
    "imagenet": ("build_imagenet", "source", ("labels", "devkit_meta")),
    "coco": ("build_karpathy", "source", ("images",)),
    "flickr30k": ("build_karpathy", "source", ("images",)),
    "cc3m": ("build_cc3m", "source", ("images",)),
    "cc12m": ("build_cc3m", "source", ("images",)),
    "webdataset": ("build_webdataset", "source", ()),
    "audiocaps": ("build_audiocaps", "source", ("audio",)),
    "clotho": ("build_clotho", "source", ("audio",)),
    "folder": ("build_folder", "source", ()),
}
WHERE_TO_GET = {
    "imagenet": "ImageNet ILSVRC2012 validation images (image-net.org, after registration)",
    "coco": "COCO 2014 images (cocodataset.org) and Karpathy's dataset_coco.json",
    "flickr30k": "Flickr30K images (by request from its authors) and dataset_flickr30k.json",
    "cc3m": "CC3M/CC12M downloaded with img2dataset (a TSV of caption + file, or its output "
            "folder)",
    "cc12m": "CC12M downloaded with img2dataset",
    "webdataset": "img2dataset webdataset tars, e.g. /data/cc3m/{00000..00331}.tar",
    "audiocaps": "AudioCaps CSVs (github.com/cdjkim/audiocaps) and the downloaded clips",
    "clotho": "Clotho v2 captions CSVs and audio (zenodo)",
}


def make_source_problems(make: dict) -> list[str]:
    """Paths a ``make:`` block names that do not exist (empty when it can run)."""
    kind = make.get("kind")
    if kind not in BUILDERS:
        return [f"unknown make kind {kind!r}; use one of {', '.join(BUILDERS)}"]
    _, main, others = BUILDERS[kind]
    problems = []
    hint = WHERE_TO_GET.get(kind, "")
    if main:
        source = make.get(main)
        if not source:
            problems.append(f"make {kind} needs '{main}'" + (f" ({hint})" if hint else ""))
        elif "{" not in str(source) and not Path(source).exists():
            problems.append(f"{source} does not exist" + (f": {hint}" if hint else ""))
    for option in others:
        value = make.get(option)
        if value and not Path(value).exists():
            problems.append(f"{option} {value} does not exist")
    return problems


def make_manifest(step: dict) -> Path:
    """Build the manifest a data step names (``make: {kind: ..., ...}``) at its path."""
    from alignpipe import builders

    make = dict(step["make"])
    kind = make.pop("kind")
    out = Path(step["manifest"])
    if kind not in BUILDERS:
        raise AlignpipeError(f"unknown make kind {kind!r}; use one of {', '.join(BUILDERS)}")
    if kind == "toy":
        from alignpipe.toy import make_toy

        folder = Path(make.pop("out", out.parent))
        make_toy(folder, **make)
        if not out.exists():
            raise AlignpipeError(f"make toy wrote into {folder} but {out} is not among its "
                                 f"files (toy.parquet, prompts.parquet)")
        return out
    function = getattr(builders, BUILDERS[kind][0])
    if kind in ("coco", "flickr30k"):
        make["dataset"] = kind
    if kind == "webdataset":
        make["shards"] = make.pop("source")
    if kind == "prompts" and "templates" in make:
        make["template_set"] = make.pop("templates")
    accepted = set(inspect.signature(function).parameters) - {"out"}
    unknown = sorted(set(make) - accepted)
    if unknown:
        raise AlignpipeError(f"make {kind}: unknown option(s) {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(accepted))}")
    function(out=out, **make)
    return out


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub answers at all (it never does on an air-gapped machine)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_cached_reason(encoder: str) -> str | None:
    """Why `encoder`'s weights would have to come from the hub (None when they need not)."""
    from huggingface_hub import try_to_load_from_cache

    from alignpipe.encoders import get_encoder_spec, resolve_weights

    spec = get_encoder_spec(encoder)
    if resolve_weights(spec, None).kind != "hub":
        return None  # test encoders, installed copies (register_installed_copy)
    repo = f"timm/{spec.model_id}" if spec.backend == "timm" else spec.model_id
    if "/" in repo and isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None
    return f"the weights of {spec.model_id} are not in the local hub cache"


def weights_problems(step: dict) -> list[str]:
    """Why an embed step could not load its encoder's weights here (empty when it can)."""
    weights = step.get("weights")
    if weights:
        return [] if Path(weights).exists() or weights == "random" else [
            f"weights {weights} do not exist"]
    reason = _not_cached_reason(str(step["encoder"]))
    if reason is None or _hub_reachable():
        return []
    return [f"{step['encoder']}: {reason} and the hub is unreachable from here: download them "
            f"once where it is reachable, or point `weights:` (--set "
            f"embed.<id>.weights=PATH) at a local copy"]
