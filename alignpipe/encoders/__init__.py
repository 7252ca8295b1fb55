"""Frozen encoders by short name: the registry, and `load_encoder` to get a runnable adapter.

>>> from alignpipe.encoders import list_encoders, load_encoder
>>> [s.name for s in list_encoders("dinov2*")]
['dinov2', 'dinov2-b', 'dinov2-g', 'dinov2-s']
>>> enc = load_encoder("test-vit", device="cpu")   # the same adapter as dinov2, tiny and seeded
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.encoders import zoo  # noqa: F401  (registers the named encoders)
from alignpipe.encoders.base import Encoder, resolve_device
from alignpipe.encoders.hub import fail_fast
from alignpipe.encoders.registry import (
    EncoderError,
    EncoderSpec,
    get_encoder_spec,
    is_registered,
    list_encoders,
    register_encoder,
    with_overrides,
)
from alignpipe.encoders.weights import WeightsSource, resolve_weights

__all__ = [
    "Encoder", "EncoderError", "EncoderSpec", "WeightsSource", "get_encoder_spec",
    "is_registered", "list_encoders", "load_encoder", "register_encoder", "resolve_weights",
    "resolve_spec",
]

_VISION_TYPES = {"dinov2", "dinov2_with_registers", "dinov3_vit", "vit", "deit", "beit",
                 "vit_msn", "vit_mae", "ijepa", "clip_vision_model", "siglip_vision_model"}
_ADAPTERS = {
    "timm": ("alignpipe.encoders.vision", "TimmImageEncoder"),
    "hf-vision": ("alignpipe.encoders.vision", "HFImageEncoder"),
    "hf-clip-image": ("alignpipe.encoders.vision", "HFImageEncoder"),
    "hf-text": ("alignpipe.encoders.text", "HFTextEncoder"),
    "hf-clip-text": ("alignpipe.encoders.text", "HFTextEncoder"),
    "hf-whisper": ("alignpipe.encoders.audio", "WhisperAudioEncoder"),
    "hf-ast": ("alignpipe.encoders.audio", "ASTAudioEncoder"),
    "hf-clap": ("alignpipe.encoders.audio", "ClapAudioEncoder"),
}


def _auto_backend(config, modality: str | None) -> tuple[str, str]:
    """(backend, modality) of an ``hf:`` checkpoint from its config's model_type."""
    kind = config.model_type
    if kind == "clip":
        return ("hf-clip-text", "text") if modality == "text" else ("hf-clip-image", "image")
    if kind == "whisper":
        return "hf-whisper", "audio"
    if kind == "audio-spectrogram-transformer":
        return "hf-ast", "audio"
    if kind == "clap":
        if modality == "text":
            raise EncoderError("CLAP's text tower is not wired up; embed its audio tower")
        return "hf-clap", "audio"
    if kind in _VISION_TYPES:
        return "hf-vision", "image"
    return "hf-text", "text"


def resolve_spec(spec: EncoderSpec, source: WeightsSource,
                 modality: str | None = None) -> tuple[EncoderSpec, object | None]:
    """Give an ``hf:`` spec its backend and modality (reads the config, not the weights)."""
    if spec.backend != "hf-auto":
        return spec, None
    from alignpipe.encoders.hf import load_config

    with fail_fast():  # embed reads the config before it loads: no network, no minutes of retries
        config = load_config(spec, source)
    backend, resolved = _auto_backend(config, modality)
    pooling = {"image": "cls", "text": "mean", "audio": None}[resolved]
    defaults = {"hf-whisper": "mean", "hf-ast": "cls+dist", "hf-clap": "projection",
                "hf-clip-image": "projection", "hf-clip-text": "projection"}
    return with_overrides(spec, backend=backend, modality=resolved,
                          pooling=defaults.get(backend, pooling)), config


def load_encoder(name: str | EncoderSpec, *, weights: str | Path | None = None,
                 image_size: int | None = None, pooling: str | None = None,
                 device: str | None = None, modality: str | None = None) -> Encoder:
    """Build the adapter for `name`, frozen, in eval mode, on `device`.

    `modality` only matters for ``hf:`` ids of two-tower models (CLIP): which tower to load.
    """
    spec = name if isinstance(name, EncoderSpec) else get_encoder_spec(name)
    source = resolve_weights(spec, weights)
    kwargs = {"pooling": pooling, "device": resolve_device(device)}  # before any download
    with fail_fast():  # no network: an error in seconds, not minutes of retries
        return _build(spec, source, modality, image_size, kwargs)


def _build(spec: EncoderSpec, source: WeightsSource, modality: str | None,
           image_size: int | None, kwargs: dict) -> Encoder:
    import importlib

    spec, config = resolve_spec(spec, source, modality)
    if image_size is not None and spec.modality != "image":
        raise EncoderError(f"--image-size applies to image encoders; {spec.name} reads "
                           f"{spec.modality}")
    module, cls_name = _ADAPTERS[spec.backend]
    adapter = getattr(importlib.import_module(module), cls_name)
    if spec.modality == "image":
        kwargs["image_size"] = image_size
    if spec.backend != "timm":
        kwargs["config"] = config
    return adapter(spec, source, **kwargs)
