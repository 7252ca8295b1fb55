"""Frozen encoders by short name: the registry, and `load_encoder` to get a runnable adapter.

>>> from alignpipe.encoders import list_encoders, load_encoder
>>> [s.name for s in list_encoders("dinov2*")]
['dinov2', 'dinov2-b', 'dinov2-g', 'dinov2-s']
>>> enc = load_encoder("test-vit", device="cpu")   # the same adapter as dinov2, tiny and seeded

Backends are adapter classes registered with `register_adapter` (`list_adapters` lists them);
the package imports each adapter module, then the zoo of named specs, so that every lookup sees
them all. A new backend: one module with a decorated class, and its line in the import below.
"""

from __future__ import annotations

from pathlib import Path

# The adapter modules register their backends, then the zoo its named specs (which need the
# adapters registered: keep zoo last on this line).
from alignpipe.encoders import audio, effnet, text, vision, zoo  # noqa: F401
from alignpipe.encoders.base import Encoder, resolve_device
from alignpipe.encoders.hf import load_config
from alignpipe.encoders.hub import fail_fast
from alignpipe.encoders.registry import (
    AUTO_BACKEND,
    Adapter,
    EncoderError,
    EncoderSpec,
    ImagePreprocessing,
    auto_adapter,
    get_adapter,
    get_encoder_spec,
    is_registered,
    list_adapters,
    list_encoders,
    register_adapter,
    register_encoder,
    with_overrides,
)
from alignpipe.encoders.weights import WeightsSource, resolve_weights

__all__ = [
    "Adapter", "Encoder", "EncoderError", "EncoderSpec", "ImagePreprocessing", "WeightsSource",
    "get_adapter", "get_encoder_spec", "is_registered", "list_adapters", "list_encoders",
    "load_encoder", "register_adapter", "register_encoder", "resolve_spec", "resolve_weights",
]


def resolve_spec(spec: EncoderSpec, source: WeightsSource,
                 modality: str | None = None) -> tuple[EncoderSpec, object | None]:
    """Give an ``hf:`` spec its backend, modality and default pooling from the adapter that
    claims its config's model_type (reads the config, not the weights)."""
    if spec.backend != AUTO_BACKEND:
        return spec, None
    with fail_fast():  # embed reads the config before it loads: no network, no minutes of retries
        config = load_config(spec, source)
    adapter = auto_adapter(config.model_type, modality)
    return with_overrides(spec, backend=adapter.backend, modality=adapter.modality,
                          pooling=adapter.default_pooling), config


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
    spec, config = resolve_spec(spec, source, modality)
    if image_size is not None and spec.modality != "image":
        raise EncoderError(f"--image-size applies to image encoders; {spec.name} reads "
                           f"{spec.modality}")
    adapter = get_adapter(spec.backend)
    if adapter.modality == "image":
        kwargs["image_size"] = image_size
    return adapter.cls(spec, source, config=config, **kwargs)
