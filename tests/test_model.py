"""A fitted run as a model (alignpipe.model): raw inputs through stage one's preprocessing and
the heads equal the heads applied to the stored latents; zero-shot, search, export, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from typer.testing import CliRunner

import alignpipe
from alignpipe.app.cli import app
from alignpipe.app.toy import class_names
from alignpipe.embed import embed
from alignpipe.fit import fit
from alignpipe.model import InputError, ModelError, export_model, load_model, search_store
from alignpipe.model.aligned import Side, _weights_for, load_side_encoder

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
FIT = {"epochs": 20, "standardize": True, "out_dim": 64, "batch_size": 256, "val_every": 20,
       "lr": 3e-3}
ROWS = [0, 2, 5, 11, 17, 23]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """The toy set embedded with test-vit, minilm, test-audio; linear image–text and
    audio–text runs (about 10 s on 2 idle cores)."""
    root = tmp_path_factory.mktemp("project")
    toy = root / "toy"
    shutil.copytree(REPO / "data_manifests" / "toy", toy)
    cache, runs = root / "cache", root / "runs"
    stores = {}
    for encoder in ("test-vit", "minilm", "test-audio"):
        embed(toy / "toy.parquet", encoder, cache=cache, progress=False)
        stores[encoder] = cache / "toy" / encoder
    fit(stores["test-vit"], stores["minilm"], method="linear",
        out=runs / "image-text", overrides=FIT)
    fit(stores["test-audio"], stores["minilm"], method="linear",
        out=runs / "audio-text", overrides={**FIT, "epochs": 4, "val_every": 4})
    manifest = alignpipe.read_manifest(toy / "toy.parquet")
    return {"root": root, "toy": toy, "stores": stores, "manifest": manifest,
            "image_run": runs / "image-text", "audio_run": runs / "audio-text"}


def _column(project, name: str, rows=ROWS) -> list:
    values = project["manifest"].column(name)
    return [values[i] for i in rows]


def _stored(model, project, encoder: str, modality: str, rows=ROWS) -> torch.Tensor:
    store = alignpipe.open_store(project["stores"][encoder])
    return model.encode_latents(modality, store.read(np.asarray(rows)))


@pytest.mark.parametrize("modality,encoder,run", [
    ("image", "test-vit", "image_run"), ("text", "minilm", "image_run"),
    ("audio", "test-audio", "audio_run")])
def test_encoding_raw_inputs_equals_the_head_on_the_stored_latents(project, modality, encoder,
                                                                   run):
    model = load_model(project[run])
    cells = _column(project, modality)
    raw = [str(project["toy"] / c) for c in cells] if modality != "text" else cells
    encoded = model.encode(modality, raw)
    stored = _stored(model, project, encoder, modality)
    assert encoded.shape == stored.shape
    assert torch.allclose(encoded.norm(dim=1), torch.ones(len(ROWS)), atol=1e-5)
    # latents are rounded to the store's float16 as stage one stored them: equal to ~1e-6
    assert (encoded - stored).abs().max().item() < 1e-4
    other = _stored(model, project, encoder, modality, rows=[r + 40 for r in ROWS])
    assert (encoded - other).abs().max().item() > 1e-2  # a different row is not "equal"


def test_decoded_images_and_waveforms_encode_like_their_files(project):
    model = load_model(project["image_run"])
    path = project["toy"] / _column(project, "image")[0]
    image = Image.open(path).convert("RGB")
    by_path = model.encode("image", str(path))
    for value in (image, np.asarray(image), np.asarray(image).astype(np.float32) / 255.0):
        assert torch.allclose(model.encode("image", value), by_path, atol=1e-5)
    audio_model = load_model(project["audio_run"])
    wav = project["toy"] / _column(project, "audio")[0]
    wave, rate = sf.read(wav, dtype="float32")
    assert torch.allclose(audio_model.encode("audio", (wave, rate)),
                          audio_model.encode("audio", str(wav)), atol=1e-4)
    with pytest.raises(InputError, match="sample rate"):
        audio_model.encode("audio", wave)
    with pytest.raises(InputError, match="reads image and text"):
        model.encode("audio", str(wav))


def test_zero_shot_classify_ranks_by_the_shared_space(project, tmp_path):
    model = load_model(project["image_run"])
    names = class_names()
    classifier = model.zero_shot(names, "photo")
    files = [str(project["toy"] / c) for c in _column(project, "image")]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    predictions = model.classify([*files, str(bad)], k=3)
    assert len(predictions) == len(files) + 1
    assert predictions[-1].error and "not a readable image" in predictions[-1].error
    scores = model.encode("image", files) @ classifier.embeddings.T
    for p, row in zip(predictions, scores, strict=False):  # the broken file is last
        assert p.error is None and len(p.classes) == 3
        assert p.classes[0] == names[int(row.argmax())]
        assert p.probabilities == sorted(p.probabilities, reverse=True)
        assert 0 < sum(p.probabilities) <= 1 + 1e-6


def test_search_caption_finds_an_image_of_its_class(project):
    model = load_model(project["image_run"])
    manifest = project["manifest"]
    rows = [i for i, s in enumerate(manifest.column("split")) if s == "test"]
    hits = search_store(model, project["stores"]["test-vit"],
                        [manifest.column("text")[i] for i in rows], k=5)
    labels = [manifest.column("label")[i] for i in rows]
    top1 = np.mean([h[0].label == label for h, label in zip(hits, labels, strict=True)])
    assert top1 > 3 / 24  # chance is 1/24 (4.2%); measured 22.7%
    first = hits[0]
    assert [h.rank for h in first] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(first, first[1:], strict=False))
    assert len({h.media for h in first}) == 5  # rows sharing an image are one result
    assert all(Path(h.media).is_file() for h in first)


def test_search_refuses_a_store_of_another_encoder(project):
    model = load_model(project["image_run"])
    with pytest.raises(alignpipe.AlignpipeError, match="audio latents"):
        search_store(model, project["stores"]["test-audio"], ["a red circle"])
    embed(project["toy"] / "toy.parquet", "test-text",
          cache=project["root"] / "cache", progress=False)
    with pytest.raises(alignpipe.AlignpipeError, match="another encoder"):
        search_store(model, project["root"] / "cache" / "toy" / "test-text", ["x"])


def test_export_loads_with_nothing_else_and_gives_the_same_numbers(project, tmp_path):
    source = tmp_path / "work"
    shutil.copytree(project["toy"], source / "toy")
    shutil.copytree(project["root"] / "cache", source / "cache")
    shutil.copytree(project["image_run"], source / "runs" / "image-text")
    model = load_model(source / "runs" / "image-text")
    files = [str(source / "toy" / c) for c in _column(project, "image")]
    before = model.encode("image", files)
    text_before = model.encode("text", ["a red circle", "a big blue square"])
    out = export_model(source / "runs" / "image-text", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "test-vit" in card and "minilm" in card and "420 training pairs" in card
    config = json.loads((out / "alignpipe-model.json").read_text())
    assert {s["encoder"]["name"] for s in config["sides"].values()} == {"test-vit", "minilm"}
    assert config["sides"]["b"]["encoder"]["weights_sha256"]
    moved = tmp_path / "elsewhere"
    shutil.move(str(out), moved)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    kept = [shutil.copy(f, inputs / f"{i}{Path(f).suffix}") for i, f in enumerate(files)]
    shutil.rmtree(source)  # no cache, no manifest, no run folder
    loaded = load_model(moved)
    assert torch.allclose(loaded.encode("image", kept), before, atol=1e-6)
    assert torch.allclose(loaded.encode("text", ["a red circle", "a big blue square"]),
                          text_before, atol=1e-6)


def test_a_tampered_export_and_missing_weights_are_one_line_errors(project, tmp_path):
    out = export_model(project["image_run"], tmp_path / "export")
    heads = out / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-1] ^= 0xFF
    heads.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 .* differs"):
        load_model(out)
    side = Side("b", "text", {"name": "minilm", "weights": "dir", "weights_path": "/gone/minilm",
                              "weights_sha256": "0" * 64})
    with pytest.raises(ModelError, match="--weights text=PATH"):
        _weights_for(side)


def test_hub_weights_that_are_not_here_name_the_side_and_the_flag(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    side = Side("a", "image", {"name": "dinov2-s", "weights": "hub", "pooling": "cls",
                               "dim": 384})
    with pytest.raises(ModelError, match=r"image encoder dinov2-s .*--weights image=PATH"):
        load_side_encoder(side, torch.device("cpu"))


def test_cli_predict_search_export(project, tmp_path, monkeypatch):
    files = [str(project["toy"] / c) for c in _column(project, "image")[:2]]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(project["image_run"]), *files, str(broken),
                                 "--classes", ",".join(class_names()), "--top-k", "2",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "input,class_1,prob_1,class_2,prob_2,error"
    assert len(lines) == 4 and "broken.jpg" in lines[3] and lines[3].split(",")[1] == ""
    assert "broken.jpg" in result.output  # one line for the undecodable file

    found = tmp_path / "hits.json"
    result = runner.invoke(app, ["search", str(project["image_run"]), "--store",
                                 str(project["stores"]["test-vit"]), "--query", "a red circle",
                                 "--k", "4", "--output", str(found)])
    assert result.exit_code == 0, result.output
    hits = json.loads(found.read_text())["results"]
    assert len(hits) == 4 and hits[0]["score"] >= hits[-1]["score"]
    result = runner.invoke(app, ["search", str(project["image_run"]), "--store",
                                 str(project["stores"]["test-audio"]), "--query", "x"])
    assert result.exit_code != 0 and "audio latents" in result.output

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["export", str(project["image_run"]), str(tmp_path / "m"),
                                 "--push-to-hub", "me/toy"])
    assert result.exit_code != 0 and "hub is unreachable" in result.output
    assert "Traceback" not in result.output


def test_search_html_writes_a_gallery(project, tmp_path):
    pytest.importorskip("alignpipe.app.gallery")
    page = tmp_path / "search.html"
    result = runner.invoke(app, ["search", str(project["image_run"]), "--store",
                                 str(project["stores"]["test-vit"]), "--query", "a red circle",
                                 "--k", "3", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert page.exists() and "a red circle" in page.read_text()


def test_an_asif_run_is_a_model_and_exports_its_anchors(project, tmp_path):
    run = tmp_path / "asif"
    fit(project["stores"]["test-vit"], project["stores"]["minilm"], method="asif",
        out=run, overrides={"topk": 50})
    model = load_model(run)
    files = [str(project["toy"] / c) for c in _column(project, "image")]
    encoded = model.encode("image", files)
    stored = _stored(model, project, "test-vit", "image")
    assert (encoded.dense() - stored.dense()).abs().max().item() < 1e-4
    out = export_model(run, tmp_path / "asif-export")
    shutil.rmtree(run)
    exported = load_model(out)
    assert (exported.encode("image", files).dense() - encoded.dense()).abs().max() < 1e-5
