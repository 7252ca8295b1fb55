"""Image encoders: timm models and transformers vision towers (DINOv2, CLIP, any hf: id).

Decode threads run the resize and centre crop that the model's own config describes (one
implementation for both backends, `pixels.ResizeCrop`) on PIL images and hand over uint8
arrays; scaling and normalisation happen on the device (`PixelNormalizer`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignpipe.data.media import MediaRef, open_image
from alignpipe.encoders.base import (
    LOAD_ERRORS,
    PixelNormalizer,
    check_pooling,
    freeze,
    init_seed,
    pool_tokens,
    seeded,
    weight_error,
)
from alignpipe.encoders.hf import load_hf_model, processor_source
from alignpipe.encoders.hub import hub_problem
from alignpipe.encoders.pixels import ImagePrep, from_processor, from_timm
from alignpipe.encoders.registry import EncoderError, EncoderSpec, get_adapter, register_adapter
from alignpipe.encoders.weights import WeightsSource, weight_files

if TYPE_CHECKING:
    from PIL import Image
    from torchvision.transforms import Compose
    from transformers import BaseImageProcessor, PretrainedConfig

TIMM_DIR_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers vision configs (model_type) that run as a plain tower: CLS/mean token pooling
HF_VISION_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit", "deit", "beit",
                   "vit_msn", "vit_mae", "ijepa", "clip_vision_model", "siglip_vision_model")


# ---- timm ---------------------------------------------------------------------------------------
def _timm_overlay(source: WeightsSource) -> dict | None:
    """How timm should find local weights: a file, or a hub-layout folder."""
    if source.kind == "file":
        return {"file": str(source.path)}
    if source.kind == "dir":
        if any((source.path / name).exists() for name in TIMM_DIR_FILES):
            return {"file": str(source.path), "source": "local-dir"}
        files = weight_files(source.path)
        if len(files) != 1:
            raise EncoderError(f"--weights {source.path}: expected model.safetensors, "
                               f"pytorch_model.bin or exactly one weights file in this folder")
        return {"file": str(files[0])}
    return None


def _split_timm_transform(transform: Compose) -> list:
    """timm's eval transform up to ToTensor: the PIL resize/crop steps run on CPU threads."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    steps = list(transform.transforms)
    for i, step in enumerate(steps):
        if isinstance(step, (MaybeToTensor, T.ToTensor)):
            rest = steps[i + 1:]
            if not all(isinstance(s, T.Normalize) for s in rest):
                raise EncoderError(f"unexpected timm transform steps after ToTensor: {rest}")
            return steps[:i]
    raise EncoderError(f"timm transform has no ToTensor step: {steps}")


class _KeyReport(logging.Handler):
    """Collects timm's report of checkpoint keys the model did not get or did not use."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Missing keys", "Unexpected keys")):
            self.problems.append(message.split(" discovered")[0].split(" found")[0])


@contextmanager
def _timm_key_report() -> Iterator[_KeyReport]:
    """timm loads with strict=False once the classifier is dropped (num_classes=0) and only
    logs what did not fit; a local file that fits nothing must be an error, not random init."""
    logger = logging.getLogger("timm.models._builder")
    report, level, propagate = _KeyReport(), logger.level, logger.propagate
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


def _timm_hub_cached(model_id: str) -> bool | None:
    """Whether timm's hub weights for `model_id` are in the local cache; None: not a hub model."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_id)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    names = ([cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else
             ["model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
              "open_clip_pytorch_model.bin"])
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _check_timm_hub(spec: EncoderSpec, source: WeightsSource) -> None:
    """Without a hub and a cached copy, say so before building the model (a ViT-g takes a
    minute and 4 GB to build, only to find nothing to load into it)."""
    if hub_problem() is None or _timm_hub_cached(spec.model_id) is not False:
        return
    raise weight_error(spec, source, OSError("the weights are not in the local hub cache"))


def _create_timm(spec: EncoderSpec, source: WeightsSource,
                 image_size: int | None) -> torch.nn.Module:
    import timm

    if source.kind == "hub":
        _check_timm_hub(spec, source)
    kwargs = dict(spec.model_kwargs)
    if image_size:
        kwargs["img_size"] = image_size  # ViTs resample their position embedding to this size
    pretrained = source.kind not in ("test", "random")
    overlay = _timm_overlay(source)

    def create(**extra: Any) -> torch.nn.Module:
        return timm.create_model(spec.model_id, pretrained=pretrained, num_classes=0,
                                 pretrained_cfg_overlay=overlay, **extra)

    try:
        with seeded(init_seed(spec, source)), _timm_key_report() as report:
            try:
                model = create(**kwargs)
            except TypeError:
                if "img_size" not in kwargs:
                    raise
                kwargs.pop("img_size")  # CNNs take any size; the transform alone sets it
                model = create(**kwargs)
    except EncoderError:
        raise
    except LOAD_ERRORS as err:
        raise weight_error(spec, source, err) from None
    if source.local and report.problems:
        raise EncoderError(f"{spec.name}: weights {source.path} does not fit {spec.model_id}: "
                           f"{'; '.join(report.problems)[:500]}")
    return model


@register_adapter("timm", modality="image", poolings=("cls", "mean", "cls+mean", "model"))
class TimmImageEncoder:
    """Any timm model; ViTs pool tokens (cls, mean, cls+mean), others use timm's own head."""

    modality = "image"
    sort_key = None
    # How the model is built and its weights loaded; a subclass may map another checkpoint
    # layout onto a timm architecture (alignpipe/encoders/effnet.py).
    create_model = staticmethod(_create_timm)

    def __init__(self, spec: EncoderSpec, source: WeightsSource, *, image_size: int | None,
                 pooling: str | None, device: torch.device,
                 config: PretrainedConfig | None = None) -> None:
        from timm.data import create_transform, resolve_data_config

        self.spec, self.source, self.device = spec, source, device
        size = image_size or spec.image_size
        model = self.create_model(spec, source, size)
        tokens = getattr(model, "num_prefix_tokens", None) is not None and getattr(
            model, "cls_token", None) is not None
        self.prefix_tokens = int(model.num_prefix_tokens) if tokens else 0
        allowed = get_adapter(spec.backend).poolings if tokens else ("model",)
        self.pooling = check_pooling(spec, pooling if pooling or tokens else "model", allowed)
        self.model = freeze(model, device)
        args = {"input_size": (3, size, size)} if size else {}
        if spec.crop_pct is not None:
            args["crop_pct"] = spec.crop_pct  # the paper's eval crop, not timm's config
        pixels = spec.pixels
        for key in ("interpolation", "mean", "std"):  # what the spec declares, it runs
            if pixels is not None and getattr(pixels, key) is not None:
                args[key] = getattr(pixels, key)
        self.data_config = resolve_data_config(args, model=model)
        transform = from_timm(self.data_config, f"timm pretrained_cfg of {spec.model_id}")
        if transform is not None:
            self.steps = [ImagePrep(transform)]
            self.preprocessing = transform.record()
        else:  # timm's squash/border crop modes: its own transform
            self.steps = _split_timm_transform(create_transform(**self.data_config,
                                                                is_training=False))
            self.preprocessing = {"library": "timm.data.create_transform"}
        self.normalize = PixelNormalizer(self.data_config["mean"], self.data_config["std"],
                                         device, channels_last=True)
        width = int(getattr(model, "head_hidden_size", model.num_features))
        self.dim = width * 2 if self.pooling == "cls+mean" else width

    def prepare(self, value: MediaRef) -> np.ndarray:
        return self.prepare_image(open_image(value))

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB PIL image -> what `collate` stacks (alignpipe.model feeds these)."""
        for step in self.steps:
            image = step(image)
        return np.asarray(image, dtype=np.uint8)

    def collate(self, items: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"pixels": torch.from_numpy(np.stack(items))}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.normalize(batch["pixels"])
        if self.pooling == "model":
            return self.model(x)
        return pool_tokens(self.model.forward_features(x), self.pooling, self.prefix_tokens)

    def describe(self) -> dict:
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        preprocessing = {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in self.data_config.items()}
        return {"backend": self.spec.backend, "model_id": self.spec.model_id,
                "hub_id": cfg.get("hf_hub_id") if self.source.kind == "hub" else None,
                "pooling": self.pooling, "image_size": int(self.data_config["input_size"][-1]),
                "preprocessing": {**preprocessing, **self.preprocessing},
                **self.source.record()}


# ---- transformers -------------------------------------------------------------------------------
def _image_processor(spec: EncoderSpec, source: WeightsSource) -> BaseImageProcessor:
    from transformers import AutoImageProcessor

    where = processor_source(spec, source, "preprocessor_config.json")
    try:
        return AutoImageProcessor.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise EncoderError(f"{spec.name}: cannot load the image processor from {where}: "
                           f"{err}") from None


@register_adapter("hf-vision", modality="image", poolings=("cls", "mean", "cls+mean"),
                  model_types=HF_VISION_TYPES)
@register_adapter("hf-clip-image", modality="image", poolings=("projection",),
                  model_types=("clip",))
class HFImageEncoder:
    """A transformers vision model: a plain tower (DINOv2, ViT) or CLIP's projected tower."""

    modality = "image"
    sort_key = None

    def __init__(self, spec: EncoderSpec, source: WeightsSource, *, image_size: int | None,
                 pooling: str | None, device: torch.device,
                 config: PretrainedConfig | None = None) -> None:
        from transformers import AutoModel, CLIPVisionModelWithProjection

        self.spec, self.source, self.device = spec, source, device
        self.projected = spec.backend == "hf-clip-image" or (
            config is not None and config.model_type == "clip")
        backend = "hf-clip-image" if self.projected else "hf-vision"
        self.pooling = check_pooling(spec, pooling, get_adapter(backend).poolings)
        cls = CLIPVisionModelWithProjection if self.projected else AutoModel
        self.model = freeze(load_hf_model(cls, spec, source), device)
        self.processor = _image_processor(spec, source)
        self.image_size = image_size
        self.transform = from_processor(self.processor, image_size)
        if self.transform is not None:  # the same resize/crop code as the timm backend
            self.prep = ImagePrep(self.transform)
            self.normalize = PixelNormalizer(self.transform.mean, self.transform.std, device,
                                             channels_last=True)
        else:  # a processor with rules of its own: run it (without --image-size)
            if image_size:
                raise EncoderError(f"{spec.name}: --image-size is not supported for "
                                   f"{type(self.processor).__name__}; drop it to use the "
                                   f"processor's own size")
            self.prep = None
            self.normalize = PixelNormalizer(self.processor.image_mean,
                                             self.processor.image_std, device,
                                             channels_last=False,
                                             rescale=float(self.processor.rescale_factor))
        cfg = self.model.config
        # CLIP-style towers resample their position embedding only when asked (DINOv2 always)
        takes = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.forward_args = {"interpolate_pos_encoding": True} if takes and image_size else {}
        self.prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        width = int(cfg.projection_dim if self.projected else cfg.hidden_size)
        self.dim = width * 2 if self.pooling == "cls+mean" else width

    def prepare(self, value: MediaRef) -> np.ndarray | torch.Tensor:
        return self.prepare_image(open_image(value))

    def prepare_image(self, image: Image.Image) -> np.ndarray | torch.Tensor:
        """A decoded RGB PIL image -> what `collate` stacks (alignpipe.model feeds these)."""
        if self.prep is not None:
            return self.prep(image)
        pixels = self.processor(images=image, do_rescale=False, do_normalize=False,
                                return_tensors="pt")["pixel_values"][0]
        if pixels.dtype != torch.uint8:  # PIL-backend processors hand back float pixel values
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        return pixels

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        if self.prep is not None:
            return {"pixels": torch.from_numpy(np.stack(items))}
        return {"pixels": torch.stack(items)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.normalize(batch["pixels"])
        out = self.model(pixel_values=x, **self.forward_args)
        if self.projected:
            return out.image_embeds
        return pool_tokens(out.last_hidden_state, self.pooling, self.prefix_tokens)

    def describe(self) -> dict:
        if self.transform is not None:
            preprocessing = self.transform.record()
            crop = self.transform.crop
            image_size = crop[0] if crop else self.image_size
        else:
            preprocessing = {"library": "transformers image processor", **{
                k: v for k, v in self.processor.to_dict().items()
                if k in ("size", "crop_size", "resample", "image_mean", "image_std",
                         "rescale_factor", "do_center_crop", "image_processor_type")}}
            image_size = self.image_size
        return {"backend": self.spec.backend, "model_id": self.spec.model_id,
                "revision": getattr(self.model.config, "_commit_hash", None),
                "pooling": self.pooling, "image_size": image_size,
                "preprocessing": preprocessing, **self.source.record()}

