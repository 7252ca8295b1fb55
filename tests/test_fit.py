"""`alignpipe fit` end to end on synthetic stores: every method through the CLI, the run folder,
a pinned-loss recipe, exact resume, refusals, dropped rows, validation without a split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import alignpipe.fit.loop as loop_module
from alignpipe.app.cli import app
from alignpipe.app.synthetic import make_synthetic
from alignpipe.fit import fit, resolve_config, run_is_complete, run_state
from alignpipe.util.errors import AlignpipeError

runner = CliRunner()
TINY = {"blocks": 1, "expansion": 2, "out_dim": 16, "batch_size": 64, "epochs": 2,
        "warmup_steps": 2, "dropout": 0.1}


def tiny(method: str, **more) -> dict:
    keys = resolve_config(method)
    return {k: v for k, v in {**TINY, **more}.items() if k in keys}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("fit"), train=300, val=60, test=100, dim_a=24,
                          dim_b=16, hidden=8, private=4, classes=5, captions_per_item=1)


@pytest.mark.parametrize("method", ["linear", "mlp", "fusemix", "asif"])
def test_each_method_through_the_cli(method, data, tmp_path):
    out = tmp_path / method
    args = ["fit", str(data.store_a), str(data.store_b), "--method", method, "--out", str(out),
            "--no-progress"]
    if method == "asif":
        args += ["--set", "topk=40"]
    else:
        args += ["--epochs", "2", "--batch-size", "64", "--set", "out_dim=16"]
        if method != "linear":
            args += ["--set", "blocks=1", "--set", "expansion=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output
    files = {p.name for p in out.iterdir()}
    common = {"config.yaml", "log.txt", "metrics.jsonl", "run.json"}
    if method == "asif":
        assert files == common | {"anchors.safetensors"}
        assert load_file(str(out / "anchors.safetensors"))["anchor_rows"].shape == (300,)
    else:
        assert files == common | {"heads-best.safetensors", "heads-last.safetensors",
                                  "checkpoint.safetensors", "curves.png"}
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
        assert set(json.loads(lines[0])["val"]) == {"image_to_text", "text_to_image",
                                                     "mean_recall"}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == method and config["stores"]["a"]["modality"] == "image"
    assert config["stores"]["b"]["manifest_sha256"] == config["manifest"]["sha256"]
    summary = json.loads((out / "run.json").read_text())
    assert summary["complete"] and summary["train_pairs"] == 300 and summary["val_pairs"] == 60


def test_list_methods():
    result = runner.invoke(app, ["fit", "--list-methods"])
    assert result.exit_code == 0
    for name in ("linear", "mlp", "fusemix", "asif"):
        assert name in result.output


def test_recipe_pins_the_loss(data, tmp_path):
    """A tiny seeded mlp: the loss of its first epochs is pinned (catches silent loop changes)."""
    fit(data.store_a, data.store_b, method="mlp", out=tmp_path / "r", progress=False,
        overrides=tiny("mlp", batch_size=100, epochs=2, seed=3))
    losses = [json.loads(line)["train_loss"]
              for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([6.7400, 6.2510], abs=2e-3)


def test_resume_continues_exactly(data, tmp_path, monkeypatch):
    overrides = tiny("fusemix", epochs=4, batch_size=32)
    fit(data.store_a, data.store_b, method="fusemix", out=tmp_path / "whole", progress=False,
        overrides=overrides)

    def killed(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "_after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(data.store_a, data.store_b, method="fusemix", out=tmp_path / "cut", progress=False,
            overrides=overrides)
    monkeypatch.undo()
    args = dict(method="fusemix", overrides=overrides)
    assert run_state(tmp_path / "cut", data.store_a, data.store_b, **args) == "incomplete"
    with pytest.raises(AlignpipeError, match="pass --resume"):
        fit(data.store_a, data.store_b, out=tmp_path / "cut", progress=False, **args)

    result = runner.invoke(app, ["fit", str(data.store_a), str(data.store_b), "--method",
                                 "fusemix", "--out", str(tmp_path / "cut"), "--resume",
                                 "--no-progress", "--epochs", "4", "--batch-size", "32",
                                 *[f"--set={k}={v}" for k, v in overrides.items()
                                   if k not in ("epochs", "batch_size")]])
    assert result.exit_code == 0, result.output
    whole, cut = load_file(str(tmp_path / "whole" / "heads-last.safetensors")), \
        load_file(str(tmp_path / "cut" / "heads-last.safetensors"))
    assert all(np.array_equal(whole[k].numpy(), cut[k].numpy()) for k in whole)
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert run_is_complete(tmp_path / "cut", data.store_a, data.store_b, **args)
    assert "resuming after epoch 2" in (tmp_path / "cut" / "log.txt").read_text()


def test_run_is_complete_tracks_config_and_stores(data, tmp_path):
    out = tmp_path / "run"
    overrides = {k: str(v) for k, v in tiny("linear").items()}
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=overrides)
    assert run_is_complete(out, data.store_a, data.store_b, method="linear",
                           overrides=overrides)
    assert not run_is_complete(out, data.store_a, data.store_b, method="linear",
                               overrides={**overrides, "lr": "0.01"})
    assert not run_is_complete(out, data.store_b, data.store_a, method="linear",
                               overrides=overrides)
    assert not run_is_complete(tmp_path / "nothing", data.store_a, data.store_b,
                               method="linear")
    again = fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
                overrides=overrides)  # finished: returns the stored summary
    assert again.best_epoch >= 1
    with pytest.raises(AlignpipeError, match="holds a different run"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides={**overrides, "lr": "0.01"})


def test_refusals(data, tmp_path):
    other = make_synthetic(tmp_path / "other", train=30, val=5, test=5, dim_a=24, dim_b=16,
                           hidden=8, private=4, seed=1)
    result = runner.invoke(app, ["fit", str(data.store_a), str(other.store_b), "--out",
                                 str(tmp_path / "x"), "--no-progress"])
    assert result.exit_code == 2 and "different manifests" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(AlignpipeError, match="both hold image latents"):
        fit(data.store_a, data.store_a, method="mlp", out=tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_config_file_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: mlp\nblocks: 2\ndropout: 0.3\n")
    cfg = resolve_config("mlp", path, {"dropout": "0.5", "lr": "1e-4", "precision": "bf16"})
    assert (cfg["blocks"], cfg["dropout"], cfg["lr"], cfg["precision"]) == (2, 0.5, 1e-4, "bf16")
    with pytest.raises(AlignpipeError, match="unknown key 'blcks' for method mlp"):
        resolve_config("mlp", overrides={"blcks": "2"})
    with pytest.raises(AlignpipeError, match="blocks: expected an integer"):
        resolve_config("mlp", overrides={"blocks": "two"})
    with pytest.raises(AlignpipeError, match="for method 'fusemix' but --method is 'mlp'"):
        resolve_config("mlp", {"method": "fusemix"})
    with pytest.raises(AlignpipeError, match="unknown key 'epochs' for method asif"):
        resolve_config("asif", overrides={"epochs": "3"})
    for name in ("linear", "mlp", "fusemix", "asif"):  # the shipped files are the defaults
        assert resolve_config(name, f"pipelines/fit/{name}.yaml") == resolve_config(name)


def test_dropped_rows_and_batch_reduction_are_logged(tmp_path):
    data = make_synthetic(tmp_path / "d", train=100, val=20, test=10, dim_a=12, dim_b=8,
                          hidden=4, private=2, invalid={"a": [0, 1, 2], "b": [2, 3, 110]})
    summary = fit(data.store_a, data.store_b, method="fusemix", out=tmp_path / "r",
                  progress=False, overrides=tiny("fusemix", batch_size=20480, epochs=1))
    assert summary.dropped_rows == {"train": 4, "val": 1, "invalid_in_a": 3, "invalid_in_b": 3}
    assert summary.train_pairs == 96 and summary.batch_size == 48
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "dropped rows invalid in either store: 4 train, 1 val" in log
    assert "reduced from 20480 because the training set has 96 valid rows" in log


def test_validation_by_hash_without_split_column(tmp_path):
    data = make_synthetic(tmp_path / "d", train=400, val=0, test=0, dim_a=12, dim_b=8,
                          hidden=4, private=2, split_column=False)
    summary = fit(data.store_a, data.store_b, method="linear", out=tmp_path / "r",
                  progress=False, overrides=tiny("linear", epochs=1, val_fraction=0.1))
    assert 20 <= summary.val_pairs <= 60 and summary.train_pairs + summary.val_pairs == 400
    assert "no split column" in (tmp_path / "r" / "log.txt").read_text()


QUALITY = {
    "linear": {"epochs": 30, "batch_size": 128, "out_dim": 32, "warmup_steps": 10},
    "mlp": {"epochs": 40, "batch_size": 128, "out_dim": 32, "blocks": 1, "expansion": 2,
            "warmup_steps": 10},
    "fusemix": {"epochs": 80, "batch_size": 128, "out_dim": 32, "blocks": 1, "expansion": 2,
                "warmup_steps": 10},
    "asif": {"topk": 200},
}


def test_every_method_beats_chance_on_held_out_retrieval(tmp_path):
    """On the synthetic benchmark (200 test items: chance R@1 0.5%, R@5 2.5%)."""
    from alignpipe.app.results import eval_retrieval

    data = make_synthetic(tmp_path / "q", train=800, val=100, test=200, dim_a=48, dim_b=32,
                          hidden=12, private=6, noise=0.3)
    for method, overrides in QUALITY.items():
        out = tmp_path / method
        fit(data.store_a, data.store_b, method=method, out=out, progress=False,
            overrides=overrides)
        result = eval_retrieval(out, data.store_a, data.store_b, split="test")
        for direction in ("image_to_text", "text_to_image"):
            assert result[direction]["R@1"] > 8, (method, result)    # > 16× chance
            assert result[direction]["R@5"] > 30, (method, result)


def test_a_refused_run_leaves_no_folder(tmp_path):
    data = make_synthetic(tmp_path / "d", train=3, val=2, test=2, dim_a=6, dim_b=4, hidden=2,
                          private=1)
    with pytest.raises(AlignpipeError, match="only 3 valid training rows"):
        fit(data.store_a, data.store_b, method="fusemix", out=tmp_path / "runs" / "r",
            progress=False, overrides={"blocks": 1})
    assert not (tmp_path / "runs" / "r").exists()
