"""Resize and centre crop: the one CPU image transform both image backends run.

timm describes an eval transform by an input size and a crop fraction, a transformers processor
by a shortest edge and a crop size; `ResizeCrop` is what either becomes, and the decode threads
run it with torchvision on PIL images (DINOv2's own eval code, timm's transform, and the PIL
image processors freeze-align used). So one image gives the same pixels in either backend.

`--image-size S` keeps the model's own ratio of resize to crop: DINOv2 resizes the shorter side
to 256 and crops 224 (a crop fraction of 0.875), so S=448 resizes to 512 and crops 448.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from alignpipe.encoders.registry import EncoderError

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

# PIL's resampling filter numbers, as transformers processors store them.
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
INTERPOLATIONS = frozenset(PIL_FILTERS.values())


@dataclass(frozen=True)
class ResizeCrop:
    """resize: the shorter side (an int) or (height, width); crop: (height, width) or None."""

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # which config it was read from, for the store's attrs

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise EncoderError(f"image interpolation {self.interpolation!r} is not supported; "
                               f"use one of {', '.join(sorted(INTERPOLATIONS))}")

    def steps(self) -> list:
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        out = []
        if self.resize is not None:
            out.append(T.Resize(self.resize, interpolation=mode))
        if self.crop is not None:
            out.append(T.CenterCrop(self.crop))
        return out

    def record(self) -> dict:
        """The store's ``preprocessing`` attr: what the decode threads actually ran."""
        return {"resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
                "resize_rule": "shorter side" if isinstance(self.resize, int) else "exact",
                "crop": list(self.crop) if self.crop else None,
                "interpolation": self.interpolation, "mean": [float(m) for m in self.mean],
                "std": [float(s) for s in self.std], "scale": "1/255",
                "library": "torchvision on PIL", "config": self.source}


class ImagePrep:
    """Runs a `ResizeCrop` on a decoded RGB image -> HWC uint8 array (thread-safe)."""

    def __init__(self, transform: ResizeCrop) -> None:
        self.transform = transform
        self._steps = transform.steps()

    def __call__(self, image: Image.Image) -> np.ndarray:
        for step in self._steps:
            image = step(image)
        return np.asarray(image, dtype=np.uint8)


def scaled_resize(crop: int, crop_fraction: float) -> int:
    """The shorter side to resize to so that a centre crop of `crop` keeps `crop_fraction`
    (timm's rule: floor(crop / fraction); 224 at 0.875 -> 256)."""
    return math.floor(crop / crop_fraction)


def from_timm(data_config: dict, source: str) -> ResizeCrop | None:
    """timm's centre-crop eval transform as a ResizeCrop; None for its other crop modes."""
    if data_config.get("crop_mode", "center") != "center":
        return None
    _, height, width = data_config["input_size"]
    fraction = data_config.get("crop_pct") or 0.875  # timm's own default
    if height == width:
        resize: int | tuple[int, int] = scaled_resize(height, fraction)
    else:  # timm keeps the aspect ratio then; not a case we reproduce
        return None
    return ResizeCrop(resize=resize, crop=(height, width),
                      interpolation=str(data_config["interpolation"]),
                      mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                      source=source)


def _set_fields(size: Any) -> dict:
    """A processor's size (a dict, or transformers 5's SizeDict) without its unset fields."""
    return {k: v for k, v in dict(size or {}).items() if v is not None}


def from_processor(processor: BaseImageProcessor,
                   image_size: int | None) -> ResizeCrop | None:
    """A transformers image processor's resize and centre crop, at `image_size` if given.

    Handles the two plain layouts (shortest edge + optional crop, as DINOv2/CLIP/BiT; exact
    height x width, as ViT/SigLIP); None for anything else, which then runs the processor.
    """
    if getattr(processor, "crop_pct", None) is not None:  # ConvNeXt-style rules of their own
        return None
    size = _set_fields(processor.size) if getattr(processor, "do_resize", True) else {}
    crop = (_set_fields(processor.crop_size) if getattr(processor, "do_center_crop", False)
            else {})
    resample = getattr(processor, "resample", 3)
    interpolation = PIL_FILTERS.get(int(resample)) if resample is not None else "bilinear"
    if interpolation is None:
        return None
    if crop and set(crop) != {"height", "width"}:
        return None
    crop_hw = (int(crop["height"]), int(crop["width"])) if crop else None
    if set(size) == {"shortest_edge"}:
        shortest = int(size["shortest_edge"])
        resize: int | tuple[int, int] | None = shortest
        if image_size:
            if crop_hw:  # keep the processor's resize/crop ratio: 256/224 -> 512/448
                resize = image_size * shortest // crop_hw[0]
                crop_hw = (image_size, image_size)
            else:
                resize = image_size
    elif set(size) == {"height", "width"}:
        resize = (int(size["height"]), int(size["width"]))
        if image_size:
            if crop_hw:
                resize = (image_size * resize[0] // crop_hw[0],
                          image_size * resize[1] // crop_hw[1])
                crop_hw = (image_size, image_size)
            else:
                resize = (image_size, image_size)
    elif not size:
        resize = None
        if image_size:
            return None
    else:
        return None
    plain = (getattr(processor, "do_normalize", True) and getattr(processor, "do_rescale", True)
             and math.isclose(float(getattr(processor, "rescale_factor", 1 / 255)), 1 / 255))
    if not plain:
        return None
    return ResizeCrop(resize=resize, crop=crop_hw, interpolation=interpolation,
                      mean=tuple(processor.image_mean), std=tuple(processor.image_std),
                      source=f"transformers {type(processor).__name__}")
