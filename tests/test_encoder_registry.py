"""Issue 9, item 3 (encoders): adapters register themselves with their poolings, the spec carries
the preprocessing contract, and a backend defined here alone embeds through `embed`."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import alignpipe.encoders as encoders
from alignpipe.data.store import open_store
from alignpipe.embed import embed
from alignpipe.encoders import (
    EncoderError,
    EncoderSpec,
    ImagePreprocessing,
    get_adapter,
    get_encoder_spec,
    list_adapters,
    list_encoders,
    load_encoder,
    register_adapter,
    register_encoder,
    resolve_spec,
)
from alignpipe.encoders import registry as encoder_registry
from alignpipe.encoders.base import check_pooling
from alignpipe.encoders.pixels import from_processor, from_timm
from alignpipe.encoders.registry import CLIP_MEAN, IMAGENET_MEAN, auto_adapter, with_overrides
from alignpipe.encoders.weights import WeightsSource
from alignpipe.util.registry import Registry

PACKAGE = Path(encoders.__file__).parent


# ---- one place per backend ----------------------------------------------------------------------
def test_every_backend_is_a_registered_adapter_declaring_its_poolings():
    backends = {a.backend: a for a in list_adapters()}
    assert set(backends) == {"timm", "timm-efficientnet-lite", "hf-vision", "hf-clip-image",
                             "hf-text", "hf-clip-text", "hf-whisper", "hf-ast", "hf-clap"}
    for spec in list_encoders():
        adapter = get_adapter(spec.backend)
        assert spec.poolings == adapter.poolings
        assert spec.pooling in adapter.poolings
        assert spec.modality == adapter.modality
    assert backends["hf-ast"].poolings == ("cls+dist", "mean")
    assert backends["hf-ast"].default_pooling == "cls+dist"
    assert backends["timm"].cls.__name__ == "TimmImageEncoder"
    assert backends["hf-clip-text"].cls is backends["hf-text"].cls  # one class, two backends


def test_list_adapters_takes_a_wildcard_and_unknown_backends_name_the_known_ones():
    assert [a.backend for a in list_adapters("hf-clip*")] == ["hf-clip-image", "hf-clip-text"]
    assert list_adapters("nothing*") == []
    with pytest.raises(EncoderError, match=r"unknown encoder backend 'onnx'; known: hf-ast"):
        get_adapter("onnx")
    with pytest.raises(ValueError, match="no registered adapter"):
        register_encoder(lambda: EncoderSpec(name="orphan", backend="onnx", model_id="x",
                                             modality="text", pooling="mean"))


@pytest.mark.parametrize(("model_type", "hint", "backend", "pooling"), [
    ("clip", None, "hf-clip-image", "projection"),
    ("clip", "image", "hf-clip-image", "projection"),
    ("clip", "text", "hf-clip-text", "projection"),
    ("clip", "audio", "hf-clip-image", "projection"),
    ("whisper", None, "hf-whisper", "mean"),
    ("audio-spectrogram-transformer", None, "hf-ast", "cls+dist"),
    ("clap", None, "hf-clap", "projection"),
    ("dinov2", None, "hf-vision", "cls"),
    ("siglip_vision_model", "image", "hf-vision", "cls"),
    ("bert", None, "hf-text", "mean"),        # no adapter claims it: the fallback
    ("roberta", "image", "hf-text", "mean"),  # the hint only chooses among claimants
])
def test_hf_checkpoints_pick_the_adapter_claiming_their_model_type(model_type, hint, backend,
                                                                   pooling):
    """The table `_auto_backend` and `resolve_spec`'s defaults wrote by hand before."""
    adapter = auto_adapter(model_type, hint)
    assert (adapter.backend, adapter.default_pooling) == (backend, pooling)


def test_resolve_spec_takes_backend_modality_and_pooling_from_the_adapter(monkeypatch):
    class Config:
        model_type = "whisper"

    monkeypatch.setattr(encoders, "load_config", lambda spec, source: Config())
    spec, config = resolve_spec(get_encoder_spec("hf:someone/whisper-ish"), WeightsSource("hub"))
    assert (spec.backend, spec.modality, spec.pooling) == ("hf-whisper", "audio", "mean")
    assert isinstance(config, Config)
    assert resolve_spec(get_encoder_spec("test-text"), WeightsSource("hub"))[1] is None


def test_adapter_modules_are_ordinary_imports_of_the_package():
    """No importlib dispatch: the import-cycle test sees the package import each adapter."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "alignpipe.encoders" for alias in node.names}
    assert {"audio", "text", "vision", "zoo"} <= names
    assert "importlib" not in (PACKAGE / "__init__.py").read_text()
    for module in ("vision", "text", "audio"):
        source = (PACKAGE / f"{module}.py").read_text()
        assert "@register_adapter(" in source
        assert 'allowed = ("' not in source  # poolings are declared once, in the decorator


# ---- the preprocessing contract -----------------------------------------------------------------
def test_dinov2_contract_is_what_timms_config_and_the_spec_give():
    """The declared interpolation/mean/std equal timm's pretrained config (no weights read),
    and resize/crop follow image_size and crop_pct: the same ResizeCrop the adapter builds."""
    import timm
    from timm.data import resolve_data_config

    for name in ("dinov2", "dinov2-s", "dinov2-b", "dinov2-g"):
        spec = get_encoder_spec(name)
        cfg = timm.models.get_pretrained_cfg(spec.model_id).to_dict()
        data = resolve_data_config({"input_size": (3, spec.image_size, spec.image_size),
                                    "crop_pct": spec.crop_pct}, pretrained_cfg=cfg)
        made = from_timm(data, "timm")
        contract = spec.preprocessing
        assert (contract.resize, contract.crop) == (made.resize, made.crop[0]) == (256, 224)
        assert (contract.interpolation, contract.mean, contract.std) == (
            made.interpolation, made.mean, made.std)


def test_clip_contract_is_what_its_processor_gives():
    from transformers import CLIPImageProcessor

    made = from_processor(CLIPImageProcessor(), None)  # the class defaults: CLIP's own
    contract = get_encoder_spec("clip-l14-image").preprocessing
    assert (contract.resize, contract.crop, contract.interpolation, contract.mean,
            contract.std) == (made.resize, made.crop[0], made.interpolation, made.mean,
                              made.std)
    assert contract.mean == CLIP_MEAN


def test_a_loaded_timm_adapter_runs_the_spec_contract():
    """Fields the spec gives are what the decode threads run (recorded in the store attrs);
    the rest is the model's config, and the spec says so."""
    plain = get_encoder_spec("test-vit")
    assert plain.preprocessing == ImagePreprocessing(crop=32)
    assert plain.describe_preprocessing() == (
        "crop 32; resize, interpolation, mean, std from the model's config")
    pixels = ImagePreprocessing(interpolation="bilinear", mean=(0.1, 0.2, 0.3),
                                std=(0.4, 0.5, 0.6))
    spec = with_overrides(plain, name="test-vit-contract", crop_pct=0.5, pixels=pixels)
    recorded = load_encoder(spec, device="cpu").describe()["preprocessing"]
    contract = spec.preprocessing.record()
    assert contract == {"resize": 64, "crop": 32, "interpolation": "bilinear",
                        "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert recorded["resize"] == contract["resize"]
    assert recorded["crop"] == [contract["crop"]] * 2
    for key in ("interpolation", "mean", "std"):
        assert recorded[key] == contract[key]


def test_list_encoders_shows_the_contract_without_loading_a_model():
    code = ("import sys; from typer.testing import CliRunner; from alignpipe.app.cli import app; "
            "r = CliRunner().invoke(app, ['embed', '--list-encoders']); print(r.output); "
            "print('LOADED', [m for m in ('timm', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent.parent,
                         env={**os.environ, "COLUMNS": "250"}).stdout
    assert "LOADED []" in out  # neither library imported, so no config and no weights read
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "preprocessing" in lines["name"]
    assert "resize 256, crop 224, bicubic, imagenet mean/std" in lines["dinov2"]
    assert "resize 224, crop 224, bicubic, openai-clip mean/std" in lines["clip-l14-image"]
    assert "from the model's config" in lines["test-vit"]
    assert "16000 Hz, centre 30 s" in lines["whisper"]
    assert "prefix 'query: '" in lines["e5-large"]
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)


# ---- the plug-in point: a backend and an encoder defined here, run by embed -------------------
@pytest.fixture()
def scratch_registries(monkeypatch):
    """Copies of the adapter and encoder registries, so what a test registers leaves with it."""
    for attr in ("ADAPTERS", "_REGISTRY"):
        original = getattr(encoder_registry, attr)
        copy = Registry(original.kind)
        for name in original.names():
            copy.add(name, original.get(name))
        monkeypatch.setattr(encoder_registry, attr, copy)


def _register_toy() -> None:
    @register_adapter("toy-bytes", modality="text", poolings=("bytes", "words"))
    class ToyBytesEncoder:
        """Text -> a fixed vector from the sha256 of its bytes (or of its word count)."""

        modality = "text"
        sort_key = None

        def __init__(self, spec, source, *, pooling, device, config=None):
            self.spec, self.source, self.device = spec, source, device
            self.pooling = check_pooling(spec, pooling, get_adapter(spec.backend).poolings)
            self.dim = spec.dim

        def prepare(self, value):
            text = str(value)
            key = text if self.pooling == "bytes" else str(len(text.split()))
            digest = hashlib.sha256(key.encode()).digest()[: self.dim]
            return np.frombuffer(digest, dtype=np.uint8).astype(np.float32)

        def collate(self, items):
            return {"x": torch.from_numpy(np.stack(items))}

        def forward(self, batch):
            return batch["x"] / 255.0

        def describe(self):
            return {"backend": self.spec.backend, "model_id": self.spec.model_id,
                    "pooling": self.pooling, **self.source.record()}

    @register_encoder
    def toy_bytes() -> EncoderSpec:
        return EncoderSpec(name="toy-bytes", backend="toy-bytes", model_id="none",
                           modality="text", pooling="bytes", dim=8, batch_size=16,
                           test_config={"seed": 0}, description="sha256 of the caption")


def test_a_backend_defined_in_one_file_embeds_the_toy_manifest(scratch_registries, toy_dir,
                                                               tmp_path):
    _register_toy()
    assert [a.backend for a in list_adapters("toy*")] == ["toy-bytes"]
    assert [s.name for s in list_encoders("toy*")] == ["toy-bytes"]
    assert get_encoder_spec("toy-bytes").poolings == ("bytes", "words")

    summary = embed(toy_dir / "toy.parquet", "toy-bytes", tmp_path / "cache", progress=False,
                    latent_dtype="float32")
    store = open_store(summary.path)
    latents = store.read()
    texts = pq.read_table(toy_dir / "toy.parquet", columns=["text"]).column(0).to_pylist()
    assert latents.shape == (len(texts), 8) and summary.failed == 0 and store.complete
    assert store.encoder["backend"] == "toy-bytes" and store.encoder["pooling"] == "bytes"
    for row in (0, len(texts) - 1):  # the toy's own function of each caption, in manifest order
        want = np.frombuffer(hashlib.sha256(texts[row].encode()).digest()[:8], np.uint8) / 255
        np.testing.assert_allclose(latents[row], want, rtol=1e-6)

    # its poolings are checked where every encoder's are
    with pytest.raises(Exception, match="--pooling 'cls' is not available for toy-bytes; "
                                        "use one of bytes, words"):
        embed(toy_dir / "toy.parquet", "toy-bytes", tmp_path / "cache2", pooling="cls",
              progress=False)
    words = embed(toy_dir / "toy.parquet", "toy-bytes", tmp_path / "cache3", pooling="words",
                  progress=False, latent_dtype="float32")
    assert not np.array_equal(open_store(words.path).read(), latents)


def test_the_toy_backend_left_no_trace():
    """The scratch registries went with the test that used them."""
    assert list_adapters("toy*") == [] and list_encoders("toy*") == []
