"""What every encoder adapter provides, and the helpers they share.

An adapter splits an encoder into the part that runs on CPU threads next to the decoders
(`prepare`: one media cell -> a small array, `collate`: arrays -> batch tensors) and the part
that runs on the device (`forward`: batch -> pooled latents). Adapters are plain classes that
satisfy the `Encoder` protocol; they share helpers, not a base class.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from safetensors import SafetensorError

from alignpipe.encoders.registry import EncoderError, EncoderSpec
from alignpipe.encoders.weights import RANDOM_SEED, WeightsSource
from alignpipe.util.devices import resolve_device  # noqa: F401  (one device check for all)

# The compute dtypes an encoder may run in (a store's own dtypes are constants.LATENT_DTYPES).
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Encoder(Protocol):
    spec: EncoderSpec
    modality: str
    dim: int
    pooling: str
    device: torch.device
    # Length-bucketing key for one prepared item (text sorts by length); None keeps file order.
    sort_key: Callable[[Any], int] | None

    def prepare(self, value: Any) -> Any:
        """One manifest cell -> what `collate` stacks. Thread-safe; raises MediaError."""

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Prepared items -> CPU batch tensors (uint8 pixels, token ids, audio features)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Device batch -> (batch, dim) latents; the caller sets inference mode and autocast."""

    def describe(self) -> dict:
        """Provenance for the store's ``encoder`` attr."""


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """Compute dtype: autocast bf16 on GPUs that have it (fp16 otherwise), fp32 on CPU."""
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in COMPUTE_DTYPES:
        raise EncoderError(f"--dtype {dtype!r}: use auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def seeded(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Deterministic random init that leaves the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_seed(spec: EncoderSpec, source: WeightsSource) -> int:
    return int(spec.test_config["seed"]) if source.kind == "test" else RANDOM_SEED


def freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    return model.to(device)


def check_pooling(spec: EncoderSpec, pooling: str | None, allowed: tuple[str, ...]) -> str:
    chosen = pooling or spec.pooling or allowed[0]
    if chosen not in allowed:
        raise EncoderError(f"{spec.name}: pooling {chosen!r} is not available; use one of "
                           f"{', '.join(allowed)}")
    return chosen


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` is 1 (padding never counts)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pool_tokens(tokens: torch.Tensor, pooling: str, prefix_tokens: int) -> torch.Tensor:
    """ViT-style pooling over (batch, tokens, dim) whose first `prefix_tokens` are CLS/registers."""
    cls = tokens[:, 0]
    if pooling == "cls":
        return cls
    mean = tokens[:, prefix_tokens:].mean(1)
    if pooling == "mean":
        return mean
    if pooling == "cls+mean":
        return torch.cat([cls, mean], dim=-1)
    raise EncoderError(f"unknown token pooling {pooling!r}")


class PixelNormalizer:
    """uint8 pixels -> normalised float on the device, so only bytes cross the bus.

    `rescale` None divides by 255 like timm's ToTensor; HF processors give a rescale factor to
    multiply by. Either way the arithmetic matches the library's own CPU preprocessing.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool, rescale: float | None = None) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.rescale = rescale
        self.channels_last = channels_last

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.permute(0, 3, 1, 2) if self.channels_last else pixels).float()
        x = x.div(255.0) if self.rescale is None else x.mul(self.rescale)
        return (x - self.mean) / self.std


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """No per-load progress bars or unused-weight chatter in the middle of a progress bar;
    the caller's transformers logging settings are restored afterwards."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# What loading a checkpoint raises for a bad file or an unreachable hub (never a bug of ours).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError,
               SafetensorError)


def hub_hint() -> str:
    """Why the hub failed, as far as we know, and what to do instead."""
    from alignpipe.encoders.hub import known_problem

    problem = known_problem()
    why = f"{problem}" if problem else "no network here?"
    return f" ({why}; pass --weights PATH to a local copy)"


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (library messages often run to a paragraph)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _refused_pickle(err: BaseException) -> bool:
    return any(isinstance(e, pickle.UnpicklingError) for e in (err, err.__cause__))


def weight_error(spec: EncoderSpec, source: WeightsSource, err: Exception) -> EncoderError:
    where = source.path if source.local else f"the hub ({spec.model_id})"
    if _refused_pickle(err):  # torch.load(weights_only=True) met something not a tensor
        return EncoderError(
            f"{spec.name}: weights {where} are not plain tensors (a pickle with Python objects, "
            f"or not a checkpoint at all); alignpipe never unpickles code: give a "
            f".safetensors file or a checkpoint saved from a state_dict")
    hint = "" if source.local else hub_hint()
    return EncoderError(f"{spec.name}: cannot load weights from {where}{hint}: {one_line(err)}")
