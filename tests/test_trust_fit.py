"""Issue 8, stage two: runs that cannot report a wrong number silently.

Each test names the issue item it covers: a diverged run (1), the resume plan (5), fp32 logits
under bf16 autocast (8), `--overwrite` and stale eval results (9), the run-folder lock (20),
damaged run folders (23), `--resume` alone (26), small-data warnings (28).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import alignpipe.fit.loop as loop_module
from alignpipe.app.cli import app
from alignpipe.app.synthetic import make_synthetic
from alignpipe.fit import fit, load_run, read_metrics, resolve_config
from alignpipe.fit.runfolder import read_tensor_metadata, run_lock, save_tensors
from alignpipe.methods import create_method
from alignpipe.methods.contrastive import HeadsMethod
from alignpipe.methods.losses import symmetric_infonce
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import LockedError

runner = CliRunner()
LINEAR = {"out_dim": 8, "batch_size": 32, "epochs": 3, "warmup_steps": 2}
FUSEMIX = {"out_dim": 8, "batch_size": 32, "epochs": 3, "warmup_steps": 2, "blocks": 1,
           "expansion": 2, "dropout": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("trust-fit"), train=128, val=24, test=8,
                          dim_a=12, dim_b=8, hidden=4, private=2, classes=3)


def _kill_after(epoch_to_kill: int):
    def hook(epoch):
        if epoch == epoch_to_kill:
            raise KeyboardInterrupt
    return hook


def _killed_run(data, out, monkeypatch, method="linear", overrides=None, after=1):
    monkeypatch.setattr(loop_module, "_after_epoch", _kill_after(after))
    with pytest.raises(KeyboardInterrupt):
        fit(data.store_a, data.store_b, method=method, out=out, progress=False,
            overrides=overrides or LINEAR)
    monkeypatch.setattr(loop_module, "_after_epoch", lambda epoch: None)


def _heads_equal(x, y) -> bool:
    a, b = load_file(str(x)), load_file(str(y))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- item 1: a diverged run --------------------------------------------------------------------
def test_item1_nonfinite_loss_stops_naming_the_epoch_and_keeps_the_checkpoint(data, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "r"
    holder = {}
    real_fit = HeadsMethod.fit

    def remember(self, train, val, loop=None):
        holder["method"] = self
        return real_fit(self, train, val, loop)

    def poison(epoch):  # after epoch 1's checkpoint, the weights go NaN (a blown-up step)
        if epoch == 1:
            with torch.no_grad():
                holder["method"].model["a"].weight.fill_(float("nan"))

    monkeypatch.setattr(HeadsMethod, "fit", remember)
    monkeypatch.setattr(loop_module, "_after_epoch", poison)
    with pytest.raises(AlignpipeError, match=r"training loss became nan at epoch 2 \(step 1 "
                                             r"of 4\).*checkpoint of epoch 1 is kept"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides=LINEAR)
    monkeypatch.undo()
    assert [m["epoch"] for m in read_metrics(out)] == [1]
    assert read_tensor_metadata(out / "checkpoint.safetensors")["epoch"] == "1"
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "heads-best.safetensors"))
               .values())
    assert not (out / "run.json").exists()
    assert "diverged" in (out / "log.txt").read_text()
    # The kept checkpoint continues, with a lower lr if wanted; other changes stay refused.
    refused = runner.invoke(app, ["fit", "--out", str(out), "--resume", "--no-progress",
                                  "--lr", "0.0005", "--set", "out_dim=4"])
    assert refused.exit_code == 2 and "out_dim: 8 → 4" in refused.output
    result = runner.invoke(app, ["fit", "--out", str(out), "--resume", "--no-progress",
                                 "--lr", "0.0005"])
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["config"]["lr"] == 0.0005
    assert saved["retuned"] == [{"after_epoch": 1, "changes": {"lr": [0.001, 0.0005]}}]
    assert not (out / "diverged.json").exists() and (out / "run.json").exists()


def test_item1_only_a_diverged_run_may_change_its_lr_on_resume(data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _killed_run(data, out, monkeypatch)
    with pytest.raises(AlignpipeError, match=r"holds a different run \(config.lr"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides={**LINEAR, "lr": 0.0005}, resume=True)


def test_item1_nonfinite_validation_is_flagged_and_never_best(data, tmp_path, monkeypatch):
    """Even if the metrics counted NaN scores as hits (the old bug), validate flags them."""
    calls = {"n": 0}
    real_encode = HeadsMethod.encode

    def encode(self, side, latents):
        calls["n"] += 1
        out = real_encode(self, side, latents)
        return torch.full_like(out, float("nan")) if calls["n"] in (3, 4) else out  # epoch 2

    def perfect_if_nan(enc_a, enc_b, items_a, items_b):  # the old metrics: NaN scored 100
        if not (torch.isfinite(enc_a).all() and torch.isfinite(enc_b).all()):
            perfect = {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
            return dict(perfect), dict(perfect)
        return real_retrieval(enc_a, enc_b, items_a, items_b)

    real_retrieval = loop_module.encoded_retrieval
    monkeypatch.setattr(HeadsMethod, "encode", encode)
    monkeypatch.setattr(loop_module, "encoded_retrieval", perfect_if_nan)
    out = tmp_path / "r"
    summary = fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
                  overrides=LINEAR)
    metrics = read_metrics(out)
    assert metrics[1]["val"]["nonfinite"] is True
    assert metrics[1]["val"]["nonfinite_rows"] == {"image": 24, "text": 24}
    assert "nonfinite" not in metrics[0]["val"] and "nonfinite" not in metrics[2]["val"]
    assert summary.best_epoch != 2
    assert not summary.best_val.get("nonfinite")


def test_item1_heads_with_nonfinite_encodings_are_not_the_kept_checkpoint(data, tmp_path,
                                                                          monkeypatch):
    """Epoch 2's heads encode to NaN, epoch 3's loss is NaN: a resume starts from epoch 1."""
    holder, calls = {}, {"n": 0}
    real_fit, real_encode = HeadsMethod.fit, HeadsMethod.encode

    def remember(self, train, val, loop=None):
        holder["method"] = self
        return real_fit(self, train, val, loop)

    def encode(self, side, latents):  # called by validation only: calls 3 and 4 are epoch 2
        calls["n"] += 1
        out = real_encode(self, side, latents)
        return torch.full_like(out, float("nan")) if calls["n"] in (3, 4) else out

    def poison(epoch):
        if epoch == 2:
            with torch.no_grad():
                holder["method"].model["a"].weight.fill_(float("nan"))

    monkeypatch.setattr(HeadsMethod, "fit", remember)
    monkeypatch.setattr(HeadsMethod, "encode", encode)
    monkeypatch.setattr(loop_module, "_after_epoch", poison)
    out = tmp_path / "r"
    with pytest.raises(AlignpipeError, match=r"loss became nan at epoch 3 .*checkpoint of "
                                             r"epoch 1 is kept"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides=LINEAR)
    monkeypatch.undo()
    assert read_tensor_metadata(out / "checkpoint.safetensors")["epoch"] == "1"
    assert json.loads((out / "diverged.json").read_text())["checkpoint_epoch"] == 1
    assert read_metrics(out)[1]["val"]["nonfinite"] is True
    result = runner.invoke(app, ["fit", "--out", str(out), "--resume", "--no-progress",
                                 "--lr", "0.0005"])
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert not any(m["val"].get("nonfinite") for m in read_metrics(out))


def test_item1_no_finite_validation_at_all_keeps_nothing(data, tmp_path, monkeypatch):
    def encode(self, side, latents):
        return torch.full((len(latents), 8), float("nan"))

    monkeypatch.setattr(HeadsMethod, "encode", encode)
    out = tmp_path / "r"
    with pytest.raises(AlignpipeError, match=r"no epoch gave finite encodings on the val split "
                                             r"\(epochs 1, 2, 3\).*nothing is kept; start again"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides=LINEAR)
    assert not out.exists()
    given = tmp_path / "given"  # a folder that was there before: emptied, not left "not a run"
    given.mkdir()
    with pytest.raises(AlignpipeError, match="nothing is kept"):
        fit(data.store_a, data.store_b, method="linear", out=given, progress=False,
            overrides=LINEAR)
    assert list(given.iterdir()) == []
    monkeypatch.undo()
    fit(data.store_a, data.store_b, method="linear", out=given, progress=False, overrides=LINEAR)


# ---- item 5: a resume keeps the batch and schedule it started with ------------------------------
def test_item5_resume_reuses_the_recorded_plan_with_less_memory(data, tmp_path, monkeypatch):
    from alignpipe.fit.loop import step_bytes

    whole = tmp_path / "whole"
    fit(data.store_a, data.store_b, method="fusemix", out=whole, progress=False,
        overrides=FUSEMIX)
    cut = tmp_path / "cut"
    _killed_run(data, cut, monkeypatch, "fusemix", FUSEMIX)
    # Less free memory now: a fresh plan would halve the batch and double the steps.
    method = create_method("fusemix", resolve_config("fusemix", overrides=FUSEMIX), 12, 8)
    budget = (step_bytes(method, 16) + step_bytes(method, 32)) // 2
    monkeypatch.setattr(loop_module, "_free_memory", lambda device: budget)
    summary = fit(data.store_a, data.store_b, method="fusemix", out=cut, progress=False,
                  overrides=FUSEMIX, resume=True)
    assert summary.batch_size == 32 and summary.steps == 6
    assert _heads_equal(whole / "heads-last.safetensors", cut / "heads-last.safetensors")
    assert "as recorded in the checkpoint" in (cut / "log.txt").read_text()
    plan = json.loads(read_tensor_metadata(cut / "checkpoint.safetensors")["plan"])
    assert (plan["batch"], plan["steps_per_epoch"], plan["total_steps"], plan["seed"]) == \
        (32, 2, 6, 0)


def test_item5_resume_refuses_a_plan_it_cannot_continue(data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _killed_run(data, out, monkeypatch)
    path = out / "checkpoint.safetensors"
    meta = read_tensor_metadata(path)
    plan = json.loads(meta["plan"])
    save_tensors(path, load_file(str(path)),
                 {**meta, "plan": json.dumps({**plan, "steps_per_epoch": 7,
                                              "total_steps": 21})})
    with pytest.raises(AlignpipeError, match="steps_per_epoch: 7 in the checkpoint, 4 now"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides=LINEAR, resume=True)


# ---- item 8: fp32 logits under bf16 autocast ----------------------------------------------------
def test_item8_loss_under_bf16_autocast_equals_fp32():
    g = torch.Generator().manual_seed(0)
    za = torch.randn(256, 64, generator=g)
    zb = 0.3 * za + torch.randn(256, 64, generator=g)
    t = torch.tensor(0.01)
    reference = symmetric_infonce(za, zb, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = symmetric_infonce(za, zb, t)
        from_bf16_heads = symmetric_infonce(za.bfloat16(), zb.bfloat16(), t)
    assert under.dtype == torch.float32
    assert abs(float(under) - float(reference)) < 1e-3
    # Heads may run in bf16: the loss of their outputs is the fp32 loss of those same values.
    exact = symmetric_infonce(za.bfloat16().float(), zb.bfloat16().float(), t)
    assert abs(float(from_bf16_heads) - float(exact)) < 1e-3


def test_item8_training_loss_under_autocast_uses_fp32_logits():
    """The heads run in bf16 under autocast; the loss of their outputs is computed in fp32."""
    cfg = resolve_config("linear", overrides={"out_dim": 64, "temperature": 0.01})
    method = create_method("linear", cfg, 48, 32)
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(256, 48, generator=g)
    xb = torch.randn(256, 32, generator=g) + xa[:, :32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.training_loss(xa, xb, np.random.default_rng(0))
        za, zb = method.model["a"](xa), method.model["b"](xb)
    assert za.dtype == torch.bfloat16  # the heads did run in bf16
    exact = symmetric_infonce(za.float(), zb.float(), method.model["loss"]())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - exact.item()) < 1e-3


# ---- item 9: --overwrite leaves no stale results -------------------------------------------------
def test_item9_overwrite_clears_eval_results(data, tmp_path):
    from alignpipe.app.results import eval_retrieval

    out = tmp_path / "r"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False, overrides=LINEAR)
    eval_retrieval(out, data.store_a, data.store_b, split="test")
    written = {p.name for p in out.iterdir() if p.name.startswith("eval-")}
    assert {p.rsplit(".", 1)[1] for p in written} >= {"json", "md"}
    (out / "notes.txt").write_text("mine")
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides={**LINEAR, "lr": 0.002}, overwrite=True)
    left = {p.name for p in out.iterdir()}
    assert not left & written, left
    assert "notes.txt" in left and (out / "run.json").exists()


def test_item9_overwrite_clears_eval_results_under_any_name(data, tmp_path):
    from alignpipe.app.results import eval_retrieval

    out = tmp_path / "r"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False, overrides=LINEAR)
    eval_retrieval(out, data.store_a, data.store_b, split="test", output=out / "mine.json")
    assert {"mine.json", "mine.md"} <= {p.name for p in out.iterdir()}
    (out / "other.json").write_text(json.dumps({"produced_by": {"run": "."}}))  # not a result
    (out / "mine.txt").write_text("notes")
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides={**LINEAR, "lr": 0.002}, overwrite=True)
    left = {p.name for p in out.iterdir()}
    assert not {"mine.json", "mine.md", "mine.png"} & left, left
    assert {"other.json", "mine.txt", "run.json"} <= left


# ---- item 20: one writer per run folder ---------------------------------------------------------
def test_item20_a_second_writer_of_a_run_folder_is_refused(data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _killed_run(data, out, monkeypatch)
    before = (out / "metrics.jsonl").read_text()
    with run_lock(out):  # the first fit, still running
        with pytest.raises(LockedError, match=r"run folder .*being written by another"):
            fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
                overrides=LINEAR, resume=True)
    assert (out / "metrics.jsonl").read_text() == before
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False, overrides=LINEAR,
        resume=True)  # once it is released, the resume goes ahead
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert not list(tmp_path.glob(".*lock"))


# ---- item 23: damaged run folders are one-line errors --------------------------------------------
def test_item23_config_sizes_are_bounded():
    for key, value in (("blocks", 1000000), ("out_dim", -1), ("expansion", 0),
                       ("dropout", 1.0), ("log_every", 0)):
        with pytest.raises(AlignpipeError, match=key):
            resolve_config("mlp", overrides={key: value})
    with pytest.raises(AlignpipeError, match="topk"):
        resolve_config("asif", overrides={"topk": 0})
    with pytest.raises(AlignpipeError, match="--set dropout"):  # a python tag, not a traceback
        resolve_config("mlp", overrides={"dropout": "!!python/object/apply:os.system ['true']"})
    with pytest.raises(AlignpipeError, match="parameters"):
        create_method("mlp", resolve_config("mlp", overrides={"blocks": 64, "expansion": 64}),
                      1 << 16, 8)


@pytest.mark.parametrize("edit", ["out_dim: -1", "blocks: 1000000", "python", "list",
                                  "not yaml"])
def test_item23_an_edited_config_yaml_is_refused(data, tmp_path, edit):
    out = tmp_path / "r"
    fit(data.store_a, data.store_b, method="mlp", out=out, progress=False,
        overrides={**FUSEMIX, "epochs": 1})
    path = out / "config.yaml"
    text = path.read_text()
    if edit == "python":
        text = "method: !!python/object/apply:os.system ['echo hi']\n" + text.split("\n", 1)[1]
    elif edit == "list":
        text = "- method\n- stores\n"
    elif edit == "not yaml":
        text = "method: [unclosed\n"
    else:
        key = edit.split(":")[0]
        text = "\n".join(f"  {edit}" if line.startswith(f"  {key}:") else line
                         for line in text.splitlines())
    path.write_text(text)
    with pytest.raises(AlignpipeError, match="config.yaml: damaged run config"):
        load_run(out)
    result = runner.invoke(app, ["fit", "--out", str(out), "--resume", "--no-progress"])
    assert result.exit_code == 2 and "config.yaml" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["garbage", "empty"])
def test_item23_damaged_heads_are_one_line(data, tmp_path, damage):
    out = tmp_path / "r"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides={**LINEAR, "epochs": 1})
    (out / "heads-best.safetensors").write_bytes(b"not a tensor file" if damage == "garbage"
                                                 else b"")
    with pytest.raises(AlignpipeError, match="heads-best.safetensors: damaged heads, not a "
                                             "readable"):
        load_run(out)
    result = runner.invoke(app, ["eval", "retrieval", str(data.store_a), str(data.store_b),
                                 "--run", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_item23_heads_of_another_shape_are_one_line(data, tmp_path):
    out = tmp_path / "r"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides={**LINEAR, "epochs": 1})
    save_tensors(out / "heads-best.safetensors", {"a.weight": torch.zeros(3, 3)})
    with pytest.raises(AlignpipeError, match="heads-best.safetensors: damaged heads: it does "
                                             "not fit"):
        load_run(out)


def test_item23_a_damaged_run_summary_is_one_line(data, tmp_path):
    out = tmp_path / "r"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides={**LINEAR, "epochs": 1})
    (out / "run.json").write_text("[1, 2")
    with pytest.raises(AlignpipeError, match="run.json: damaged run summary"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides={**LINEAR, "epochs": 1})


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_item23_damaged_checkpoint_is_one_line(data, tmp_path, monkeypatch, damage):
    out = tmp_path / "r"
    _killed_run(data, out, monkeypatch)
    path = out / "checkpoint.safetensors"
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2] if damage == "truncated" else b"")
    with pytest.raises(AlignpipeError, match="checkpoint.safetensors: damaged checkpoint, "
                                             "not a readable"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides=LINEAR, resume=True)


def test_item23_a_torn_metrics_line_is_dropped_on_resume(data, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    fit(data.store_a, data.store_b, method="linear", out=whole, progress=False,
        overrides=LINEAR)
    out = tmp_path / "r"
    _killed_run(data, out, monkeypatch, after=2)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "train_lo')  # a kill mid-append
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False, overrides=LINEAR,
        resume=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert _heads_equal(whole / "heads-last.safetensors", out / "heads-last.safetensors")
    # A damaged line that is not the last is an error naming the file and line.
    (out / "metrics.jsonl").write_text(lines[0] + "\nnonsense\n" + lines[2] + "\n")
    with pytest.raises(AlignpipeError, match="metrics.jsonl: line 2"):
        read_metrics(out)


# ---- item 26: --resume alone --------------------------------------------------------------------
def test_item26_resume_alone_reuses_the_saved_config(data, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    fit(data.store_a, data.store_b, method="fusemix", out=whole, progress=False,
        overrides=FUSEMIX)
    cut = tmp_path / "cut"
    _killed_run(data, cut, monkeypatch, "fusemix", FUSEMIX)
    refused = runner.invoke(app, ["fit", "--out", str(cut), "--resume", "--no-progress",
                                  "--epochs", "5"])
    assert refused.exit_code == 2 and "epochs: 3 → 5" in refused.output
    same = runner.invoke(app, ["fit", "--out", str(cut), "--resume", "--no-progress",
                               "--epochs", "3"])  # a flag equal to the saved value is fine
    assert same.exit_code == 0, same.output
    assert _heads_equal(whole / "heads-last.safetensors", cut / "heads-last.safetensors")


def test_item26_resume_alone_through_the_cli(data, tmp_path, monkeypatch):
    cut = tmp_path / "cut"
    _killed_run(data, cut, monkeypatch)
    result = runner.invoke(app, ["fit", "--out", str(cut), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in read_metrics(cut)] == [1, 2, 3]


# ---- item 28: small-data traps ------------------------------------------------------------------
def test_item28_a_tiny_validation_split_is_warned_about(data, tmp_path):
    summary = fit(data.store_a, data.store_b, method="linear", out=tmp_path / "r",
                  progress=False, overrides={**LINEAR, "epochs": 1})
    assert any("only 24 validation pairs" in w for w in summary.warnings)
    assert "warning: only 24 validation pairs" in (tmp_path / "r" / "log.txt").read_text()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["warnings"] == summary.warnings
    result = runner.invoke(app, ["fit", str(data.store_a), str(data.store_b), "--method",
                                 "linear", "--out", str(tmp_path / "r"), "--no-progress",
                                 *[f"--set={k}={v}" for k, v in LINEAR.items()],
                                 "--epochs", "1"])
    assert result.exit_code == 0 and "only 24 validation pairs" in result.output


def test_item28_asif_topk_above_the_anchors_says_so(data, tmp_path):
    summary = fit(data.store_a, data.store_b, method="asif", out=tmp_path / "r",
                  progress=False, overrides={"topk": 800})
    assert any("topk 800 is more than the 128 anchor pairs" in w for w in summary.warnings)
    fine = fit(data.store_a, data.store_b, method="asif", out=tmp_path / "s",
               progress=False, overrides={"topk": 40})
    assert not any("topk" in w for w in fine.warnings)


# ---- item 17: a full disk during a fit -----------------------------------------------------------
def test_item17_a_full_disk_mid_fit_is_one_line_naming_the_file_and_resume_finishes(
        data, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import alignpipe.fit.runfolder as runfolder_module
    from alignpipe.fit.runfolder import RunLog
    from alignpipe.util.fsutil import DiskError

    out, ref = tmp_path / "r", tmp_path / "ref"
    fit(data.store_a, data.store_b, method="linear", out=ref, progress=False, overrides=LINEAR)
    real, calls = runfolder_module.save_file, []

    def full_in_epoch_2(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 3:  # epoch 1 wrote heads-last, heads-best and the checkpoint
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")  # what safetensors raises, no OSError
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(runfolder_module, "save_file", full_in_epoch_2)
    result = runner.invoke(app, ["fit", str(data.store_a), str(data.store_b), "--method",
                                 "linear", "--out", str(out), "--no-progress",
                                 *(f"--set={k}={v}" for k, v in LINEAR.items())])
    assert result.exit_code == DiskError.exit_code, result.output
    assert result.output.startswith(f"error: {out / 'heads-last.safetensors'}: no space left")
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert result.output.rstrip().endswith("with --resume (the run's checkpoint is kept)")
    monkeypatch.setattr(runfolder_module, "save_file", real)
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False, overrides=LINEAR,
        resume=True)
    assert _heads_equal(out / "heads-best.safetensors", ref / "heads-best.safetensors")
    # a write error without a file name (a log line on a full disk) still names the file
    if os.path.exists("/dev/full"):
        with pytest.raises(DiskError, match="^/dev/full: no space left"):
            RunLog(Path("/dev/full"), echo=False)("a line")
