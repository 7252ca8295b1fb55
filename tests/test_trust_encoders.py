"""Issue 8, encoder items: DINOv2's crop in both backends (4), failing fast without a hub (15),
devices that are not there (18), pickled --weights (23) and CPU threads (27)."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data import pairing as latents
from alignpipe.data.manifest import write_manifest
from alignpipe.data.media import MediaRef
from alignpipe.data.store import open_store
from alignpipe.embed import embed
from alignpipe.encoders import EncoderError, get_encoder_spec, hub, load_encoder
from alignpipe.encoders import base as encoder_base
from alignpipe.encoders.registry import with_overrides
from alignpipe.util import devices
from alignpipe.util.devices import DeviceError

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# facebook/dinov2-*'s preprocessor_config.json on the hub, as freeze-align loads it
DINOV2_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": IMAGENET["mean"], "image_std": IMAGENET["std"],
    "image_processor_type": "BitImageProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}
runner = CliRunner()


def _no_probe(*_):
    raise AssertionError("a load from local files probed the hub")


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> dict:
    """A tiny DINOv2 in each backend, saved locally; odd-sized noise images (the worst case
    for resize and crop rounding)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                            img_size=224, **TINY_VIT)
    save_file(vit.state_dict(), root / "timm.safetensors")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, image_size=224, patch_size=14)
                ).save_pretrained(root / "hf")
    (root / "hf" / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(301, 517), (640, 480), (233, 229)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    spec = with_overrides(get_encoder_spec("dinov2-s"), model_kwargs=TINY_VIT)
    return {"root": root, "images": images, "timm_spec": spec}


def _pixels(encoder, images: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = encoder.collate([encoder.prepare(MediaRef(p)) for p in images])["pixels"]
    return batch, encoder.normalize(batch)


def _paper_transform(path: Path, resize: int, crop: int) -> torch.Tensor:
    """DINOv2's own eval transform (dinov2/data/transforms.py), HWC -> NCHW normalised."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(crop), T.ToTensor(), T.Normalize(**IMAGENET)])
    return transform(Image.open(path).convert("RGB"))


# ---- item 4: one crop for DINOv2, the paper's, in both backends ---------------------------------
@pytest.mark.parametrize(("image_size", "resize", "crop"), [(None, 256, 224), (448, 512, 448)])
def test_dinov2_timm_and_hf_see_the_same_pixels_as_the_paper(dinov2, monkeypatch, image_size,
                                                              resize, crop):
    monkeypatch.setattr(hub, "_probe", _no_probe)  # local files: the hub is never asked
    timm_enc = load_encoder(dinov2["timm_spec"], weights=dinov2["root"] / "timm.safetensors",
                            device="cpu", image_size=image_size)
    hf_enc = load_encoder("hf:facebook/dinov2-large", weights=dinov2["root"] / "hf",
                          device="cpu", image_size=image_size)
    timm_raw, timm_x = _pixels(timm_enc, dinov2["images"])
    hf_raw, hf_x = _pixels(hf_enc, dinov2["images"])
    assert timm_raw.shape == (3, crop, crop, 3)
    assert torch.equal(timm_raw, hf_raw)
    assert torch.equal(timm_x, hf_x)
    paper = torch.stack([_paper_transform(p, resize, crop) for p in dinov2["images"]])
    torch.testing.assert_close(timm_x, paper, rtol=0, atol=1e-6)
    for encoder in (timm_enc, hf_enc):
        record = encoder.describe()["preprocessing"]
        assert (record["resize"], record["crop"], record["interpolation"]) == (
            resize, [crop, crop], "bicubic")
        assert (record["mean"], record["std"]) == (IMAGENET["mean"], IMAGENET["std"])
        assert encoder.describe()["image_size"] == crop
    with torch.inference_mode():  # and both models run at that size
        assert timm_enc.forward({"pixels": timm_raw}).shape == (3, 32)
        assert hf_enc.forward({"pixels": hf_raw}).shape == (3, 32)


def test_image_size_keeps_each_processors_own_ratio():
    from transformers import BitImageProcessor, CLIPImageProcessor, ViTImageProcessor

    from alignpipe.encoders.pixels import from_processor

    dino = BitImageProcessor(**{k: v for k, v in DINOV2_PROCESSOR.items()
                                if k != "image_processor_type"})
    assert (from_processor(dino, 518).resize, from_processor(dino, 518).crop) == (592,
                                                                                  (518, 518))
    clip = from_processor(CLIPImageProcessor(), 336)  # CLIP resizes to the crop size
    assert (clip.resize, clip.crop) == (336, (336, 336))
    vit = from_processor(ViTImageProcessor(), 384)  # exact height x width, no crop
    assert (vit.resize, vit.crop, vit.interpolation) == ((384, 384), None, "bilinear")


def test_dinov2_registry_and_timm_prefix_use_the_papers_crop():
    for name in ("dinov2", "dinov2-g", "timm:vit_large_patch14_dinov2.lvd142m"):
        assert get_encoder_spec(name).crop_pct == 0.875
    assert get_encoder_spec("timm:resnet50").crop_pct is None  # others keep timm's own


def test_hf_dinov2_store_records_its_preprocessing(dinov2, tmp_path):
    manifest = write_manifest(pa.table({"id": ["a", "b"],
                                        "image": [str(p) for p in dinov2["images"][:2]]}),
                              tmp_path / "m.parquet")
    summary = embed(manifest, "hf:facebook/dinov2-large", tmp_path / "cache",
                    weights=dinov2["root"] / "hf", image_size=448, progress=False)
    record = open_store(summary.path).encoder["preprocessing"]
    assert (record["resize"], record["crop"]) == (512, [448, 448])
    assert record["interpolation"] == "bicubic" and record["std"] == IMAGENET["std"]


# ---- item 15: no network is an error in seconds, not minutes of retries -------------------------
@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """An empty hub cache, a fresh probe state, and sleeps recorded instead of slept."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # whatever the shell running us says
    monkeypatch.setattr(hub, "_REACHABLE", {})
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s))
    return sleeps


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "hf:facebook/dinov2-small"])
def test_unreachable_hub_fails_at_once_without_retries(no_hub, monkeypatch, name):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    began = time.perf_counter()
    with pytest.raises(EncoderError, match=r"127\.0\.0\.1:9 is unreachable.*--weights PATH"):
        load_encoder(name, device="cpu")
    assert no_hub == []  # huggingface_hub's backoff (1+2+4+8+8 s per file) never ran
    assert time.perf_counter() - began < 20
    assert constants.HF_HUB_OFFLINE is False  # offline mode was switched on only for the load


def test_embed_of_an_hf_id_fails_at_once_without_retries(no_hub, monkeypatch, tmp_path):
    # embed reads an hf: id's config (for its modality) before it loads the encoder
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    toy = Path(__file__).resolve().parents[1] / "data_manifests" / "toy" / "toy.parquet"
    with pytest.raises(EncoderError, match=r"127\.0\.0\.1:9 is unreachable.*--weights PATH"):
        embed(toy, "hf:facebook/dinov2-small", tmp_path / "cache", progress=False)
    assert no_hub == []  # no backoff sleeps


def test_hf_hub_offline_fails_at_once_and_says_why(no_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_probe", _no_probe)  # offline: nothing to probe
    with pytest.raises(EncoderError, match="HF_HUB_OFFLINE is set"):
        load_encoder("timm:vit_tiny_patch16_224", device="cpu")
    assert no_hub == []


def test_probe_runs_once_and_respects_its_timeout(monkeypatch):
    calls = []

    def slow_probe(endpoint, timeout):
        calls.append(endpoint)
        return f"{endpoint} did not answer within {timeout:.0f} s"

    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(hub, "_probe", slow_probe)
    assert "did not answer" in hub.hub_problem() and "did not answer" in hub.hub_problem()
    assert len(calls) == 1
    # a name that never resolves still returns within the timeout (resolution runs in a thread)
    began = time.perf_counter()
    assert hub._probe("http://127.0.0.1:9", 0.5) is not None
    assert time.perf_counter() - began < 2


def _hub_refuses_a_request() -> bool:
    """What huggingface_hub does right before it sends any request: True when it refuses."""
    from types import SimpleNamespace

    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils._http import hf_request_event_hook

    try:
        hf_request_event_hook(SimpleNamespace(url="http://127.0.0.1:9/x", method="GET",
                                              headers={}))
    except OfflineModeIsEnabled:
        return True
    return False


@pytest.fixture()
def unreachable(monkeypatch):
    """A hub every probe finds unreachable (instantly), and a fresh probe state."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(hub, "_probe", lambda endpoint, _: f"{endpoint} is unreachable (test)")
    return constants


def test_fail_fast_in_two_threads_leaves_nothing_behind(unreachable):
    """Thread a enters, b enters, a leaves, b leaves: b still fails fast after a left, and
    afterwards nothing is offline (each block once saved and restored the patched function,
    so this order left a's patch installed for good)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    refused: dict[str, bool] = {}

    def a() -> None:
        with hub.fail_fast():
            a_in.set()
            b_in.wait(5)
            refused["a"] = _hub_refuses_a_request()
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with hub.fail_fast():
            b_in.set()
            a_out.wait(5)
            refused["b, after a left"] = _hub_refuses_a_request()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert refused == {"a": True, "b, after a left": True}
    assert not _hub_refuses_a_request()  # outside every block requests go out as usual
    assert unreachable.is_offline_mode() is False and unreachable.HF_HUB_OFFLINE is False


def test_is_offline_mode_imported_during_a_load_is_harmless_after_it(unreachable):
    """transformers binds `from huggingface_hub import is_offline_mode` when a module is first
    imported, which can be during a load: that function must not switch offline mode on for
    good when called later (it set HF_HUB_OFFLINE, and the next hub load reported
    'HF_HUB_OFFLINE is set' instead of the endpoint it could not reach)."""
    import huggingface_hub

    with hub.fail_fast():
        bound = huggingface_hub.is_offline_mode  # what such an import binds
        assert _hub_refuses_a_request() and bound()
    assert bound() is False and unreachable.HF_HUB_OFFLINE is False
    assert not _hub_refuses_a_request() and hub.known_problem() is not None


def test_local_loads_never_probe(monkeypatch):
    """transformers asks is_offline_mode() before opening a local folder too (a probe there
    cost a local load up to 3.5 s); only a request about to be sent may probe."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(hub, "_probe", _no_probe)
    with hub.fail_fast():
        assert huggingface_hub.is_offline_mode() is False  # as transformers asks it
    load_encoder("test-text", device="cpu")
    assert hub._REACHABLE == {}


# ---- item 18: a device the machine does not have ------------------------------------------------
def test_missing_gpu_is_one_line_listing_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for resolve in (devices.resolve_device, latents.resolve_device,
                    encoder_base.resolve_device):
        with pytest.raises(DeviceError, match=r"--device cuda: .*this machine has: cpu"):
            resolve("cuda")
    assert latents.resolve_device(None).type == "cpu"
    with pytest.raises(DeviceError, match="not a device name"):
        devices.resolve_device("gpu0")
    with pytest.raises(DeviceError, match="this machine has"):
        load_encoder("test-vit", device="cuda:0")


def test_gpu_index_out_of_range_and_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"cuda:2: this machine has 2 CUDA devices "
                                          r"\(cpu, cuda:0, cuda:1"):
        latents.resolve_device("cuda:2")
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        devices.resolve_device("mps")


def test_cli_fit_on_a_missing_gpu_is_an_error_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    manifest = write_manifest(pa.table({"id": ["a", "b"], "text": ["x", "y"]}),
                              tmp_path / "m.parquet")
    result = runner.invoke(app, ["embed", str(manifest), "--encoder", "test-text", "--cache",
                                 str(tmp_path / "c"), "--device", "cuda", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "this machine has: cpu" in result.output


# ---- item 23 (encoders): pickles are refused in one line, never unpickled -----------------------
class _Payload:
    def __reduce__(self):
        return (os.makedirs, (str(Path(os.environ["ALIGNPIPE_TEST_MARK"])),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, about our test pickle
def test_pickled_weights_are_refused_in_one_line(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    mark = tmp_path / "unpickled"
    monkeypatch.setenv("ALIGNPIPE_TEST_MARK", str(mark))
    evil = tmp_path / "weights.pt"
    evil.write_bytes(pickle.dumps({"embeddings.word_embeddings.weight": _Payload()}))
    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(evil.read_bytes())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    cases = [("test-text", evil), ("test-vit", evil), ("hf:someone/bert", folder),
             ("test-text", garbage), ("test-vit", garbage)]
    for name, weights in cases:
        with pytest.raises(EncoderError) as caught:
            load_encoder(name, weights=weights, device="cpu")
        message = str(caught.value)
        assert "\n" not in message and str(weights) in message, message
        if weights != garbage:
            assert "never unpickles" in message
    assert not mark.exists()


# ---- item 27: CPU threads from the free cores ---------------------------------------------------
def test_threads_follow_the_free_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "usable_cpus", lambda: 8)
    monkeypatch.setattr(devices, "_TORCH_DEFAULT_THREADS", 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.2, 6.0, 6.0))
    assert devices.pick_threads()[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (11.0, 9.0, 9.0))
    assert devices.pick_threads()[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert devices.pick_threads()[0] == 8
    monkeypatch.setattr(devices, "_TORCH_DEFAULT_THREADS", 4)  # never above torch's own default
    assert devices.pick_threads()[0] == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.pick_threads() == (3, "OMP_NUM_THREADS")
    assert devices.pick_threads(5) == (5, "--threads")
    with pytest.raises(DeviceError, match="--threads must be at least 1"):
        devices.pick_threads(0)


def test_cli_threads_option_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    manifest = write_manifest(pa.table({"id": ["a", "b"], "text": ["x", "y"]}),
                              tmp_path / "m.parquet")
    try:
        result = runner.invoke(app, ["embed", str(manifest), "--encoder", "test-text",
                                     "--cache", str(tmp_path / "c"), "--threads", "1",
                                     "--device", "cpu", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    result = runner.invoke(app, ["fit", "--threads", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("verb", [["embed"], ["fit"], ["run"], ["similarity"],
                                  ["eval", "retrieval"], ["eval", "zeroshot"]])
def test_every_verb_that_computes_takes_threads(verb):
    result = runner.invoke(app, [*verb, "--help"])
    assert result.exit_code == 0 and "--threads" in result.output
