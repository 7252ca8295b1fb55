"""Raw inputs -> what an encoder adapter's `collate` stacks, with stage one's own preprocessing.

Each modality takes what a person has at hand: file paths (``ARCHIVE.tar::MEMBER`` too), PIL
images, uint8 or float arrays, strings, waveforms with their sample rate. Files go through the
adapter's ``prepare`` exactly as `alignpipe embed` runs it; decoded images and waveforms enter
the same adapter one step later (``prepare_image``, ``prepare_wave``), after the decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignpipe.data.manifest import is_blank_text
from alignpipe.data.media import MediaError, MediaRef, centre_crop, mono_at_rate, resolve_ref
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from typing import Protocol

    import torch
    from PIL import Image

    from alignpipe.encoders.base import Encoder

    class ImageAdapter(Encoder, Protocol):
        """An image encoder adapter: `prepare` decodes a file, `prepare_image` a PIL image."""

        def prepare(self, value: MediaRef) -> np.ndarray | torch.Tensor: ...

        def prepare_image(self, image: Image.Image) -> np.ndarray | torch.Tensor: ...

    class AudioAdapter(Encoder, Protocol):
        """An audio encoder adapter: `prepare` decodes a file, `prepare_wave` a mono waveform
        at `sample_rate`, already cropped to `max_samples`."""

        sample_rate: int
        max_samples: int | None

        def prepare(self, value: MediaRef) -> np.ndarray | tuple[np.ndarray, int]: ...

        def prepare_wave(self, wave: np.ndarray) -> np.ndarray | tuple[np.ndarray, int]: ...

    class TextAdapter(Encoder, Protocol):
        def prepare(self, value: str | None) -> str: ...

    # One prepared item: what an adapter's `collate` stacks.
    Prepared = np.ndarray | torch.Tensor | tuple[np.ndarray, int] | str


class InputError(AlignpipeError):
    """An input that cannot be encoded: the wrong kind for its modality, or undecodable."""


def describe_input(value: Any) -> str:
    """A short name for an input in messages and result tables."""
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2:
        return f"waveform of {len(np.asarray(value[0]))} samples at {value[1]} Hz"
    if isinstance(value, np.ndarray):
        return f"array {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def _as_ref(value: str | Path) -> MediaRef:
    return resolve_ref(str(value), Path.cwd())


def _pil_from_array(value: np.ndarray) -> Image.Image:
    from PIL import Image

    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise MediaError(f"an image array must be HxW, HxWx3 or 3xHxW, got {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise MediaError(f"image arrays are uint8 (0..255) or float (0..1), not "
                             f"{array.dtype}")
        if not np.isfinite(array).all():
            raise MediaError("the image array holds non-finite values")
        array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def prepare_image(encoder: ImageAdapter, value: Any) -> np.ndarray | torch.Tensor:
    """A path, PIL image or array -> the image adapter's prepared item."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        return encoder.prepare(_as_ref(value))
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, Image.Image):
        return encoder.prepare_image(value.convert("RGB"))
    if isinstance(value, np.ndarray):
        return encoder.prepare_image(_pil_from_array(value))
    raise MediaError(f"an image input is a file path, a PIL image or an array, not "
                     f"{type(value).__name__}")


def prepare_audio(encoder: AudioAdapter, value: Any,
                  sample_rate: int | None) -> np.ndarray | tuple[np.ndarray, int]:
    """A path, ``(waveform, rate)`` or a waveform (with `sample_rate`) -> the audio adapter's
    prepared item: mono, resampled with soxr and centre-cropped as stage one does."""
    if isinstance(value, (str, Path)):
        return encoder.prepare(_as_ref(value))
    rate = sample_rate
    if isinstance(value, tuple) and len(value) == 2:
        value, rate = value
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise MediaError(f"an audio input is a file path, a waveform array or (waveform, "
                         f"sample_rate), not {type(value).__name__}")
    if rate is None:
        raise MediaError("a waveform needs its sample rate: pass (waveform, rate) or "
                         "sample_rate=")
    wave = np.asarray(value, dtype=np.float32)
    if wave.ndim == 2 and wave.shape[0] < wave.shape[1] and wave.shape[0] <= 8:
        wave = wave.T  # (channels, frames) -> (frames, channels)
    if wave.ndim not in (1, 2) or wave.shape[0] == 0:
        raise MediaError(f"a waveform is (frames,) or (frames, channels), got {wave.shape}")
    if not np.isfinite(wave).all():
        raise MediaError("the waveform holds non-finite samples")
    mono = mono_at_rate(wave, int(rate), encoder.sample_rate)
    return encoder.prepare_wave(centre_crop(mono, encoder.max_samples))


def prepare_text(encoder: TextAdapter, value: Any) -> str:
    if not isinstance(value, str):
        raise MediaError(f"a text input is a string, not {type(value).__name__}")
    if is_blank_text(value):
        raise MediaError("empty text")
    return encoder.prepare(value)


def prepare(encoder: Encoder, modality: str, value: Any,
            sample_rate: int | None = None) -> Prepared:
    """One raw input -> the adapter's prepared item; MediaError when it cannot be used."""
    if modality == "image":
        return prepare_image(encoder, value)
    if modality == "audio":
        return prepare_audio(encoder, value, sample_rate)
    return prepare_text(encoder, value)
