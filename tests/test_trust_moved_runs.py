"""Runs survive a moved project (issue 8, item 10): a project folder (manifest, cache and runs)
moved after a fit keeps its runs. `fit --out RUN --resume` alone finds the stores relative to the
run, a re-fit of the same spec is the same finished run, asif runs find the stores their anchors
live in, and a fit refused before it wrote anything leaves no folders behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import alignpipe.fit.loop as loop_module
from alignpipe.app.cli import app
from alignpipe.data.manifest import write_manifest
from alignpipe.embed import embed
from alignpipe.fit import fit, load_run, read_metrics, run_state
from alignpipe.fit.runfolder import run_lock
from alignpipe.util.errors import StoreError

runner = CliRunner()
TOY = Path(__file__).resolve().parents[1] / "data_manifests" / "toy"
EMBED = {"unit_rows": 20, "batch_size": 20, "workers": 1, "progress": False}
MLP = {"epochs": 2, "batch_size": 16, "out_dim": 8, "blocks": 1, "expansion": 2}
MLP_FLAGS = ("--method", "mlp", "--epochs", "2", "--batch-size", "16", "--set", "out_dim=8",
             "--set", "blocks=1", "--set", "expansion=2")
ASIF_FLAGS = ("--method", "asif", "--set", "topk=5")


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def plain(text: str) -> str:
    return " ".join(text.split())


def _stop_after_epoch_1(epoch):
    if epoch == 1:
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Embed 40 toy rows with the tiny test encoders; fit mlp (finished, and killed after epoch
    1 of 2) and asif; then move the whole project folder."""
    base = tmp_path_factory.mktemp("project")
    original = base / "original"
    shutil.copytree(TOY / "images", original / "images")
    table = pq.read_table(TOY / "toy.parquet").slice(0, 40).drop(["audio"])
    manifest = write_manifest(table, original / "m.parquet")
    for encoder in ("test-vit", "test-text"):
        embed(manifest, encoder, original / "cache", **EMBED)
    image, text = original / "cache" / "m" / "test-vit", original / "cache" / "m" / "test-text"
    runs = original / "runs"
    fit(image, text, method="mlp", out=runs / "mlp", overrides=MLP, progress=False)
    fit(image, text, method="asif", out=runs / "asif", overrides={"topk": 5}, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "_after_epoch", _stop_after_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            fit(image, text, method="mlp", out=runs / "cut", overrides=MLP, progress=False)
    moved = base / "moved"
    shutil.move(original, moved)
    return moved


def _stores(moved: Path) -> tuple[Path, Path]:
    return moved / "cache" / "m" / "test-vit", moved / "cache" / "m" / "test-text"


def test_resume_alone_continues_a_killed_run_after_the_project_moved(project):
    cut = project / "runs" / "cut"
    assert [m["epoch"] for m in read_metrics(cut)] == [1]
    result = cli("fit", "--out", cut, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in read_metrics(cut)] == [1, 2]
    stores = yaml.safe_load((cut / "config.yaml").read_text())["stores"]
    assert stores["a"]["path"] == str(_stores(project)[0].resolve())  # where they are now
    assert stores["a"]["relative_path"] == "../../cache/m/test-vit"


@pytest.mark.parametrize("name, flags", [("mlp", MLP_FLAGS), ("asif", ASIF_FLAGS)])
def test_the_same_spec_fitted_again_after_the_move_is_the_same_finished_run(project, name,
                                                                              flags):
    run = project / "runs" / name
    image, text = _stores(project)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "config.yaml"}
    assert run_state(run, image, text, method=name,
                     overrides=MLP if name == "mlp" else {"topk": 5}) == "complete"
    result = cli("fit", image, text, *flags, "--out", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "already holds this finished run" in plain(result.output)
    summary = fit(image, text, method=name, out=run, progress=False,
                  overrides=MLP if name == "mlp" else {"topk": 5})
    assert summary.cached and summary.run_dir == run  # where it is now, not where it was
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "config.yaml"}
    assert after == before  # not refitted, not replaced
    # Another spec into the same folder is still a different run.
    other = cli("fit", image, text, *flags, "--set", "seed=7", "--out", run, "--no-progress")
    assert other.exit_code == 2 and "holds a different run (config.seed: 0 → 7)" in \
        plain(other.output)


def test_eval_retrieval_of_both_runs_after_the_move(project, tmp_path):
    image, text = _stores(project)
    for name in ("mlp", "asif"):
        output = tmp_path / f"{name}.json"
        result = cli("eval", "retrieval", image, text, "--run", project / "runs" / name,
                     "--device", "cpu", "--split", "all", "--output", output)
        assert result.exit_code == 0, result.output
        assert json.loads(output.read_text())["pairs"] == 40
    # asif's anchors are read from the moved stores without being told where they are.
    loaded = load_run(project / "runs" / "asif", "cpu")
    assert loaded.method.anchors["a"].shape[0] == 24


def test_a_rerun_eval_after_the_project_moved_again_replaces_its_own_result(project, tmp_path):
    # The default-named result in the run folder records its run and stores relative to itself:
    # after a move it is still this eval's own result, not "the result of another eval".
    shutil.copytree(project, tmp_path / "here")
    for where in ("here", "there"):
        if where == "there":
            shutil.move(tmp_path / "here", tmp_path / "there")
        image, text = _stores(tmp_path / where)
        run = tmp_path / where / "runs" / "asif"
        result = cli("eval", "retrieval", image, text, "--run", run, "--device", "cpu",
                     "--split", "all")
        assert result.exit_code == 0, result.output
        written = json.loads((run / "eval-retrieval-all__m-test-vit__m-test-text.json")
                             .read_text())
        assert written["produced_by"]["stores"]["a"] == "../../cache/m/test-vit"


def test_stores_that_cannot_be_found_are_one_line_saying_how_to_point_at_them(project,
                                                                             tmp_path):
    first = tmp_path / "first"  # a copy of the project, fitted, then moved
    shutil.copytree(project / "cache", first / "cache")
    shutil.copy(project / "m.parquet", first / "m.parquet")
    fit(*_stores(first), method="asif", out=first / "runs" / "asif", overrides={"topk": 5},
        progress=False)
    fit(*_stores(first), method="mlp", out=first / "runs" / "mlp", overrides=MLP,
        progress=False)
    image, text = _stores(shutil.move(first, tmp_path / "second"))
    # The run alone elsewhere: its stores are neither at their old paths nor beside it.
    asif = shutil.move(tmp_path / "second" / "runs" / "asif", tmp_path / "elsewhere" / "asif")
    with pytest.raises(StoreError) as err:
        load_run(asif, "cpu")
    message = str(err.value)
    assert "\n" not in message and "the run's a store (image latents of test-vit" in message
    assert f"`alignpipe fit STORE_A STORE_B --out {asif} --resume`" in message
    # The stores given to eval are used when they are the run's stores.
    result = cli("eval", "retrieval", image, text, "--run", asif, "--device", "cpu",
                 "--split", "all", "--output", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    # What the message says records where they are now; then nothing more is needed.
    result = cli("fit", image, text, "--out", asif, "--resume", "--no-progress")
    assert result.exit_code == 0 and "already holds" in plain(result.output), result.output
    assert load_run(asif, "cpu").method.anchors["b"].shape[0] == 24

    mlp = shutil.move(tmp_path / "second" / "runs" / "mlp", tmp_path / "elsewhere" / "mlp")
    result = cli("fit", "--out", mlp, "--resume", "--no-progress")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pass both stores where they are now" in plain(result.output)


def test_a_refused_fit_leaves_no_folders_behind(project):
    image, text = _stores(project)
    runs = project / "runs"
    result = cli("fit", image, text, *MLP_FLAGS, "--set", "out_dim=-1", "--out",
                 runs / "new" / "deeper" / "run", "--no-progress")
    assert result.exit_code == 2 and "out_dim" in result.output
    assert not (runs / "new").exists()
    result = cli("fit", image, project / "cache" / "nothing", *MLP_FLAGS, "--out",
                 runs / "gone" / "run", "--no-progress")
    assert result.exit_code == 2
    assert not (runs / "gone").exists()
    with run_lock(runs / "locked" / "run"):  # another fit holds it and has written nothing yet
        result = cli("fit", image, text, *MLP_FLAGS, "--out", runs / "locked" / "run",
                     "--no-progress")
        assert result.exit_code != 0 and "being written by another" in plain(result.output)
    assert not (runs / "locked").exists()
    assert sorted(p.name for p in runs.iterdir()) == ["asif", "cut", "mlp"]
