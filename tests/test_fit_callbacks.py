"""The training loop emits its events to callbacks; curves.png is drawn by the app's callback.

A recording callback sees every epoch's metrics in order (a resume continues from the right
epoch), a library `fit()` writes no PNG unless given `CurvesPNG`, and the CLI still writes it.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import alignpipe.app.render as render_module
import alignpipe.fit.loop as loop_module
from alignpipe.app.cli import app
from alignpipe.app.render import CurvesPNG
from alignpipe.app.synthetic import make_synthetic
from alignpipe.fit import FitCallback, fit, read_metrics

runner = CliRunner()
LINEAR = {"out_dim": 8, "batch_size": 32, "epochs": 4, "warmup_steps": 2}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("fit-callbacks"), train=128, val=24, test=8,
                          dim_a=12, dim_b=8, hidden=4, private=2, classes=3)


class Recorder(FitCallback):
    """Every event with the epochs of the history it was given (copied, as the doc says)."""

    def __init__(self):
        self.events: list[tuple[str, list[int]]] = []
        self.records: list[dict] = []

    def on_fit_start(self, run_dir, history, names):
        self.events.append(("start", [m["epoch"] for m in history]))

    def on_epoch_end(self, run_dir, history, names):
        self.events.append(("epoch", [m["epoch"] for m in history]))
        self.records.append(json.loads(json.dumps(history[-1])))
        assert names == ("image", "text")
        assert (run_dir / "checkpoint.safetensors").exists()  # saved before the event

    def on_fit_end(self, run_dir, history, names):
        self.events.append(("end", [m["epoch"] for m in history]))


def _kill_after(epoch_to_kill: int):
    def hook(epoch):
        if epoch == epoch_to_kill:
            raise KeyboardInterrupt
    return hook


def test_a_recording_callback_sees_every_epoch_in_order(data, tmp_path):
    out, recorder = tmp_path / "run", Recorder()
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=LINEAR, callbacks=[recorder])
    assert recorder.events == [("start", []), ("epoch", [1]), ("epoch", [1, 2]),
                               ("epoch", [1, 2, 3]), ("epoch", [1, 2, 3, 4]),
                               ("end", [1, 2, 3, 4])]
    assert recorder.records == read_metrics(out)  # the same numbers as metrics.jsonl
    assert all("train_loss" in r and "mean_recall" in r["val"] for r in recorder.records)
    assert not (out / "curves.png").exists()  # a library fit draws nothing of its own


def test_val_every_emits_only_validated_epochs(data, tmp_path):
    recorder = Recorder()
    fit(data.store_a, data.store_b, method="linear", out=tmp_path / "run", progress=False,
        overrides={**LINEAR, "val_every": 3}, callbacks=[recorder])
    assert [e for e in recorder.events if e[0] == "epoch"] == [("epoch", [3]),
                                                                ("epoch", [3, 4])]


def test_a_resume_continues_from_the_right_epoch(data, tmp_path, monkeypatch):
    out, first = tmp_path / "cut", Recorder()
    monkeypatch.setattr(loop_module, "_after_epoch", _kill_after(2))
    with pytest.raises(KeyboardInterrupt):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides=LINEAR, callbacks=[first])
    monkeypatch.undo()
    # killed after epoch 2's checkpoint: no fit-end event for a run that did not finish
    assert first.events == [("start", []), ("epoch", [1]), ("epoch", [1, 2])]

    second = Recorder()
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=LINEAR, resume=True, callbacks=[second])
    assert second.events == [("start", [1, 2]), ("epoch", [1, 2, 3]), ("epoch", [1, 2, 3, 4]),
                             ("end", [1, 2, 3, 4])]
    assert first.records + second.records == read_metrics(out)


def test_a_method_without_training_emits_nothing(data, tmp_path):
    recorder = Recorder()
    fit(data.store_a, data.store_b, method="asif", out=tmp_path / "asif", progress=False,
        overrides={"topk": 20}, callbacks=[recorder])
    assert recorder.events == []


def test_a_callback_needs_only_the_events_it_uses(data, tmp_path):
    seen = []

    class OnlyEnd:
        def on_fit_end(self, run_dir, history, names):
            seen.append(len(history))

    fit(data.store_a, data.store_b, method="linear", out=tmp_path / "run", progress=False,
        overrides=LINEAR, callbacks=[OnlyEnd()])
    assert seen == [4]


def test_a_non_callback_is_refused_before_anything_is_written(data, tmp_path):
    with pytest.raises(TypeError, match="not a fit callback"):
        fit(data.store_a, data.store_b, method="linear", out=tmp_path / "run", progress=False,
            overrides=LINEAR, callbacks=[print])
    assert not (tmp_path / "run").exists()


def test_curves_png_draws_at_the_end_and_at_most_every_every_s(data, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(render_module, "plot_fit_curves",
                        lambda path, history, names: drawn.append((path, len(history))))
    out = tmp_path / "run"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=LINEAR, callbacks=[CurvesPNG()])
    assert drawn == [(out / "curves.png", 4)]  # a short run: once, when the last epoch is done
    drawn.clear()
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=LINEAR, overwrite=True, callbacks=[CurvesPNG(every_s=0)])
    assert drawn == [(out / "curves.png", n) for n in (1, 2, 3, 4)]  # not twice at the end


def test_a_library_fit_given_curves_png_writes_it(data, tmp_path):
    out = tmp_path / "run"
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=LINEAR, callbacks=[CurvesPNG()])
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_the_cli_still_writes_curves_png(data, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["fit", str(data.store_a), str(data.store_b), "--method",
                                 "linear", "--out", str(out), "--no-progress", "--epochs", "2",
                                 "--batch-size", "32", "--set", "out_dim=8",
                                 "--set", "warmup_steps=2"])
    assert result.exit_code == 0, result.output
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
