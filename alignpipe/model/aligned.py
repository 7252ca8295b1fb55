"""A fitted run as a model: both frozen encoders plus the fitted heads, on raw inputs.

``load_model(RUN_OR_EXPORT)`` rebuilds each side's frozen encoder from the spec its store
recorded (name, weights and their sha256, pooling, image size, prefix), checks that the weights
it finds are the ones the store was embedded with, and loads the fitted method (heads, or
ASIF's anchors). ``encode`` runs stage one's own preprocessing and forward on raw inputs,
rounds the latents to the store's dtype (what the heads were fitted on), and applies the head:
the result is the same as the head applied to the stored latent of that input.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignpipe.data.media import MediaError
from alignpipe.methods.space import Encoded, group_mean, num_rows, pairwise_scores
from alignpipe.model.inputs import InputError, describe_input, prepare
from alignpipe.util.constants import MODALITIES
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from alignpipe.encoders.base import Encoder
    from alignpipe.methods.base import Method

DEFAULT_TEMPERATURE = 0.01  # CLIP's logit scale of 100, when the method has none of its own
CPU_BATCH = 32
BLOCK_BATCHES = 8  # batches decoded ahead at a time


class ModelError(AlignpipeError):
    """A run or export that cannot become a model (weights missing or changed, bad files)."""


@dataclass
class Side:
    """One side of the aligned model: what its store recorded, and the encoder once loaded."""

    side: str                       # "a" | "b": the method's side
    modality: str
    encoder_attrs: dict             # the store's ``encoder`` attr (provenance and request)
    latent_dtype: str = "float16"
    weights: str | Path | None = None   # where to load the weights from instead
    encoder: Any = None

    @property
    def name(self) -> str:
        return str(self.encoder_attrs.get("name"))


@dataclass
class Encodings:
    """`embeddings` of the inputs at `ok` (in input order); `failures`: input index -> reason."""

    embeddings: Encoded
    ok: list[int]
    failures: dict[int, str] = field(default_factory=dict)


def _weights_for(side: Side) -> str | Path | None:
    """Where this side's weights are: the given path, the recorded local file when it is still
    there, an installed copy, or the hub."""
    from alignpipe.encoders import get_encoder_spec, resolve_weights

    attrs = side.encoder_attrs
    if side.weights is not None:
        return side.weights
    kind = attrs.get("weights")
    if kind == "random":
        return "random"
    if kind not in ("file", "dir"):
        return None  # hub or test: the spec knows where
    recorded = attrs.get("weights_path")
    if recorded and Path(recorded).exists():
        return recorded
    source = resolve_weights(get_encoder_spec(side.name), None)
    if source.local and source.sha256 == attrs.get("weights_sha256"):
        return source.path
    raise ModelError(
        f"the {side.modality} encoder {side.name}: its weights {recorded} (sha256 "
        f"{str(attrs.get('weights_sha256'))[:12]}…) are not here; pass them with "
        f"weights={{'{side.modality}': PATH}} (CLI: --weights {side.modality}=PATH)")


def _check_same_weights(side: Side, described: dict) -> None:
    attrs = side.encoder_attrs
    for key in ("weights_sha256", "revision", "pooling", "prefix"):
        want, got = attrs.get(key), described.get(key)
        if want is not None and got is not None and want != got:
            raise ModelError(
                f"the {side.modality} encoder {side.name}: {key} is {got!r} here but the store "
                f"was embedded with {want!r}; pass the weights it was embedded with "
                f"(weights={{'{side.modality}': PATH}}, CLI: --weights {side.modality}=PATH)")


def load_side_encoder(side: Side, device: torch.device) -> Encoder:
    """The frozen encoder of `side`, rebuilt from its recorded spec and checked against it."""
    from alignpipe.encoders import EncoderError, load_encoder

    attrs = side.encoder_attrs
    request = attrs.get("request") or {}
    try:
        encoder = load_encoder(side.name, weights=_weights_for(side),
                               image_size=request.get("image_size")
                               if side.modality == "image" else None,
                               pooling=request.get("pooling") or attrs.get("pooling"),
                               device=str(device), modality=side.modality)
    except EncoderError as err:
        raise ModelError(f"the {side.modality} encoder {side.name} cannot be loaded: {err} "
                         f"(CLI: --weights {side.modality}=PATH; API: "
                         f"weights={{'{side.modality}': PATH}})") from None
    _check_same_weights(side, encoder.describe())
    if int(attrs.get("dim", encoder.dim)) != encoder.dim:
        raise ModelError(f"the {side.modality} encoder {side.name} gives {encoder.dim}-d "
                         f"latents, the store holds {attrs.get('dim')}-d ones")
    return encoder


def _compute_dtype(attrs: dict, device: torch.device) -> torch.dtype:
    from alignpipe.encoders.base import COMPUTE_DTYPES, resolve_dtype

    recorded = attrs.get("compute_dtype")
    if device.type == "cuda" and recorded in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[recorded]
    return resolve_dtype(None, device)


def _as_list(modality: str, inputs: Any) -> list:
    """One input or a list of them -> a list (an array is one image or one waveform)."""
    if isinstance(inputs, (str, Path, np.ndarray)) or hasattr(inputs, "detach"):
        return [inputs]
    if modality == "audio" and isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(
            inputs[1], (int, float)):
        return [inputs]
    from PIL import Image

    return [inputs] if isinstance(inputs, Image.Image) else list(inputs)


@dataclass
class Prediction:
    """Top-k classes of one input, best first, with softmax probabilities over all classes."""

    input: str
    classes: list[str]
    probabilities: list[float]
    error: str | None = None


@dataclass
class ZeroShotClassifier:
    """Class embeddings in the shared space (mean of the templates' embeddings, renormalised:
    CLIP's protocol, as `alignpipe eval zeroshot --class-embedding mean`)."""

    class_names: list[str]
    templates: list[str]
    embeddings: Encoded
    temperature: float

    def scores(self, encoded: Encoded) -> torch.Tensor:
        return pairwise_scores(encoded, self.embeddings)


class AlignedModel:
    """Two frozen encoders and the fitted method that maps both into one space."""

    def __init__(self, method: Method, sides: dict[str, Side], *, name: str, method_name: str,
                 device: torch.device, info: dict | None = None) -> None:
        self.method, self.sides, self.device = method, sides, device
        self.name, self.method_name = name, method_name
        self.info = info or {}
        self.classifier: ZeroShotClassifier | None = None

    def __repr__(self) -> str:
        encoders = " ↔ ".join(f"{s.name} ({s.modality})" for s in self.sides.values())
        return f"AlignedModel({self.name}: {self.method_name}, {encoders}, {self.device})"

    @property
    def modalities(self) -> list[str]:
        return [s.modality for s in self.sides.values()]

    def side(self, modality: str) -> Side:
        for side in self.sides.values():
            if side.modality == modality:
                return side
        known = " and ".join(self.modalities)
        raise InputError(f"this model reads {known}, not {modality}")

    def encoder(self, modality: str) -> Encoder:
        """The frozen encoder of `modality`, loaded (and its weights checked) on first use."""
        side = self.side(modality)
        if side.encoder is None:
            side.encoder = load_side_encoder(side, self.device)
        return side.encoder

    @property
    def temperature(self) -> float:
        model = getattr(self.method, "model", None)
        try:
            return float(model["loss"].temperature.detach().float().cpu())
        except (AttributeError, KeyError, TypeError):
            return DEFAULT_TEMPERATURE

    # ---- encoding -------------------------------------------------------------------------------
    def latents(self, modality: str, inputs: Any, *, batch_size: int | None = None,
                sample_rate: int | None = None) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """The frozen encoder's latents of the inputs that could be used (rounded to the
        store's dtype, float32), their input indices, and input index -> reason for the rest.

        Inputs are decoded a block at a time on threads (memory stays one block of decoded
        media, however many inputs), texts sorted by length within a block as stage one does."""
        modality = self._modality(modality)
        encoder = self.encoder(modality)
        items = _as_list(modality, inputs)
        batch = batch_size or (CPU_BATCH if self.device.type == "cpu"
                               else encoder.spec.batch_size)
        failures: dict[int, str] = {}
        ok: list[int] = []
        parts: list[np.ndarray] = []

        def one(i: int) -> tuple[int, Any, str | None]:
            try:
                return i, prepare(encoder, modality, items[i], sample_rate), None
            except MediaError as err:
                return i, None, str(err)

        workers = max(1, min(8, os.cpu_count() or 1, len(items)))
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(items), batch * BLOCK_BATCHES):
                block = range(start, min(start + batch * BLOCK_BATCHES, len(items)))
                prepared = {}
                for i, item, reason in pool.map(one, block):
                    if reason is None:
                        prepared[i] = item
                    else:
                        failures[i] = reason
                ok += sorted(prepared)
                parts.append(self._forward(encoder, modality, prepared, batch))
        latents = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
        store_dtype = np.float16 if self.side(modality).latent_dtype == "float16" else np.float32
        return latents.astype(store_dtype).astype(np.float32), ok, failures

    def _forward(self, encoder: Encoder, modality: str, prepared: dict[int, Any],
                 batch: int) -> np.ndarray:
        """Latents of prepared items, in input order, under inference mode and autocast."""
        from alignpipe.encoders.base import autocast

        order = sorted(prepared)
        if encoder.sort_key is not None:  # bucket texts by length, as stage one does
            order.sort(key=lambda i: encoder.sort_key(prepared[i]))
        compute = _compute_dtype(self.side(modality).encoder_attrs, self.device)
        out = np.zeros((len(order), encoder.dim), dtype=np.float32)
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            tensors = {k: v.to(self.device) for k, v in
                       encoder.collate([prepared[i] for i in chunk]).items()}
            with torch.inference_mode(), autocast(self.device, compute):
                latents = encoder.forward(tensors)
            out[start:start + len(chunk)] = latents.float().cpu().numpy()
        rank = {i: r for r, i in enumerate(order)}
        return out[[rank[i] for i in sorted(prepared)]]

    def encode_latents(self, modality: str, latents: np.ndarray | torch.Tensor) -> Encoded:
        """Cached latents of `modality`'s encoder (rows of its store) -> the shared space."""
        side = self.side(self._modality(modality)).side
        x = torch.as_tensor(np.asarray(latents, dtype=np.float32)).to(self.device)
        return self.method.encode(side, x)

    def encode_each(self, modality: str, inputs: Any, *, batch_size: int | None = None,
                    sample_rate: int | None = None) -> Encodings:
        """Like `encode`, but an input that cannot be decoded is reported, not raised."""
        latents, ok, failures = self.latents(modality, inputs, batch_size=batch_size,
                                             sample_rate=sample_rate)
        return Encodings(self.encode_latents(modality, latents), ok, failures)

    def encode(self, modality: str, inputs: Any, *, batch_size: int | None = None,
               sample_rate: int | None = None) -> Encoded:
        """Raw inputs -> normalised embeddings in the shared space, one row per input.

        image: file paths, PIL images, uint8 (0..255) or float (0..1) arrays; text: strings;
        audio: file paths, ``(waveform, rate)`` or waveforms with `sample_rate`. One input or a
        list of them (an array is one image or one waveform)."""
        result = self.encode_each(modality, inputs, batch_size=batch_size,
                                  sample_rate=sample_rate)
        if result.failures:
            items = _as_list(self._modality(modality), inputs)
            i, reason = next(iter(sorted(result.failures.items())))
            more = len(result.failures) - 1
            raise InputError(f"cannot encode {describe_input(items[i])}: {reason}"
                             + (f" (and {more} more)" if more else ""))
        return result.embeddings

    def _modality(self, modality: str) -> str:
        if modality not in MODALITIES:
            raise InputError(f"modality must be one of {', '.join(MODALITIES)}, not "
                             f"{modality!r}")
        self.side(modality)
        return modality

    # ---- zero-shot classification ---------------------------------------------------------------
    def text_modality(self) -> str:
        if "text" not in self.modalities:
            raise InputError(f"zero-shot needs a text side; this model reads "
                             f"{' and '.join(self.modalities)}")
        return "text"

    def zero_shot(self, class_names: list[str], templates: list[str] | str = "photo"
                  ) -> ZeroShotClassifier:
        """A classifier over `class_names`: each class is the mean of its templates' normalised
        text embeddings, renormalised. `templates`: a list with one ``{}`` each, or a shipped
        set (``clip80``, ``asif7``, ``photo``) or a file, as ``manifest prompts`` takes them."""
        from alignpipe.data.builders.classes import read_templates

        names = [str(n) for n in class_names]
        if not names:
            raise InputError("zero-shot needs at least one class name")
        if len(set(names)) != len(names):
            raise InputError("class names repeat; each class needs its own name")
        texts = read_templates(templates) if isinstance(templates, (str, Path)) else list(
            templates)
        bad = [t for t in texts if t.count("{}") != 1]
        if not texts or bad:
            raise InputError("each template needs exactly one '{}' for the class name"
                             + (f" (not {bad[0]!r})" if bad else ""))
        prompts = [t.format(name) for name in names for t in texts]
        encoded = self.encode(self.text_modality(), prompts)
        groups = torch.arange(len(names)).repeat_interleave(len(texts))
        self.classifier = ZeroShotClassifier(names, texts, group_mean(encoded, groups,
                                                                        len(names)),
                                             self.temperature)
        return self.classifier

    def classify(self, inputs: Any, k: int = 5, *, modality: str | None = None,
                 classifier: ZeroShotClassifier | None = None,
                 sample_rate: int | None = None) -> list[Prediction]:
        """Top-`k` classes of each input (one Prediction per input, in order; an input that
        cannot be decoded gets its reason in `error`). Uses the last `zero_shot` classifier."""
        classifier = classifier or self.classifier
        if classifier is None:
            raise InputError("call zero_shot(class_names, templates) first")
        modality = modality or next(m for m in self.modalities if m != "text")
        items = _as_list(modality, inputs)
        result = self.encode_each(modality, items, sample_rate=sample_rate)
        predictions = [Prediction(describe_input(x), [], [], result.failures.get(i))
                       for i, x in enumerate(items)]
        if num_rows(result.embeddings):
            logits = classifier.scores(result.embeddings) / max(classifier.temperature, 1e-6)
            probs = logits.float().softmax(dim=-1).cpu()
            top = probs.topk(min(k, len(classifier.class_names)), dim=-1)
            for row, i in enumerate(result.ok):
                predictions[i].classes = [classifier.class_names[j] for j in top.indices[row]]
                predictions[i].probabilities = [float(p) for p in top.values[row]]
        return predictions
