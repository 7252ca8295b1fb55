"""`alignpipe run`: plan loading, overrides, input checks, every shipped YAML, and the toy run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.pipeline.runner import PipelineError, check_plan, load_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
runner = CliRunner()


def write_plan(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_every_shipped_pipeline_parses_and_names_registered_parts(monkeypatch):
    monkeypatch.chdir(REPO)
    assert len(PIPELINES) >= 5
    for path in PIPELINES:
        text = path.read_text()
        assert text.startswith("# Run:"), f"{path.name} must say at the top how to run it"
        assert "# Expect:" in text, f"{path.name} must say what number it should give"
        plan = load_pipeline(path)
        assert check_plan(plan) == [], path.name


def test_overrides_and_environment(tmp_path, monkeypatch):
    path = write_plan(tmp_path, {
        "name": "x", "data": {"d": {"manifest": "${DATA_ROOT:-/default}/m.parquet",
                                    "make": {"kind": "toy", "out": "${NOT_SET_ANYWHERE}"}}},
        "embed": {"e": {"data": "d", "encoder": "test-vit"}},
        "fit": {"f": {"method": "linear", "a": "e", "b": "e", "set": {"epochs": 3}}},
        "eval": [{"kind": "retrieval", "run": "f", "a": "e", "b": "e"}]})
    monkeypatch.setenv("DATA_ROOT", "/data")
    plan = load_pipeline(path, {"fit.f.method": "mlp", "fit.f.set.epochs": "7",
                                "eval.0.split": "val"})
    assert plan["data"]["d"]["manifest"] == "/data/m.parquet"
    assert plan["data"]["d"]["make"]["out"] == "${NOT_SET_ANYWHERE}"
    assert plan["fit"]["f"]["method"] == "mlp" and plan["fit"]["f"]["set"]["epochs"] == 7
    assert plan["eval"][0]["split"] == "val"
    with pytest.raises(PipelineError, match=r"'5' is not an index of a list of 1"):
        load_pipeline(path, {"eval.5.split": "val"})


def test_structural_problems_are_listed_together(tmp_path):
    path = write_plan(tmp_path, {
        "data": {"d": {"manifest": "m.parquet"}},
        "embed": {"e": {"data": "nope", "encoder": "no-such-encoder"}},
        "fit": {"f": {"method": "no-such-method", "a": "e", "b": "missing"}},
        "eval": [{"kind": "ranking"}]})
    problems = check_plan(load_pipeline(path))
    joined = "\n".join(problems)
    assert "embed.e: data 'nope' is not in the data section" in joined
    assert "unknown encoder 'no-such-encoder'" in joined
    assert "unknown method 'no-such-method'" in joined
    assert "fit.f: b 'missing' is not an embed step" in joined
    assert "eval.0: kind must be retrieval or zeroshot" in joined


def test_missing_inputs_stop_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MY_IMAGENET", raising=False)
    path = write_plan(tmp_path, {
        "name": "needs-data",
        "inputs": {"MY_IMAGENET": "ImageNet val in class subfolders"},
        "data": {"val": {"manifest": "out/val.parquet",
                         "make": {"kind": "imagenet", "source": "${MY_IMAGENET}"}},
                 "gone": {"manifest": "out/gone.parquet"}},
        "embed": {"img": {"data": "val", "encoder": "test-vit"},
                  "txt": {"data": "gone", "encoder": "minilm"}},
    })
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "nothing was run because 2 input(s) are missing" in result.output
    assert "$MY_IMAGENET is not set: ImageNet val in class subfolders" in result.output
    assert "data.gone: manifest out/gone.parquet does not exist" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy pipeline, run twice from a scratch folder: the second run must be all cache."""
    work = tmp_path_factory.mktemp("toyrun")
    shutil.copytree(REPO / "data_manifests" / "toy", work / "data_manifests" / "toy")
    shutil.copytree(REPO / "pipelines", work / "pipelines")
    import os

    old = os.getcwd()
    os.chdir(work)
    try:
        first = run_pipeline("pipelines/toy.yaml", progress=False, echo=lambda _: None)
        second = run_pipeline("pipelines/toy.yaml", progress=False, echo=lambda _: None)
    finally:
        os.chdir(old)
    return work, first, second


def test_toy_pipeline_end_to_end(toy_run):
    work, first, _ = toy_run
    assert {s.stage for s in first.steps} >= {"embed", "fit", "eval"}
    assert all(s.status == "ran" for s in first.steps if s.stage in ("embed", "fit"))
    zeroshot = [e for e in first.evals if e["kind"] == "zeroshot"]
    retrieval = [e for e in first.evals if e["kind"] == "retrieval"]
    assert len(zeroshot) == 2 and len(retrieval) == 2
    # 24 classes: chance is 4.2% top-1. The random-init test ViT is a weak encoder, so ask for
    # three times chance there; the audio clips encode colour and shape exactly, so ask for more.
    assert zeroshot[0]["metrics"]["top1"] > 12.5
    assert zeroshot[1]["metrics"]["top1"] > 30
    assert retrieval[1]["metrics"]["audio_to_text"]["R@10"] > 60
    report = (work / "runs" / "toy" / "report.md").read_text()
    assert "## Results" in report and "## Plots" in report
    saved = json.loads((work / "runs" / "toy" / "results.json").read_text())
    assert len(saved["evals"]) == 4


def test_second_run_comes_from_the_cache(toy_run):
    _, first, second = toy_run
    cached = {(s.stage, s.name) for s in second.steps if s.status == "cached"}
    assert {(s.stage, s.name) for s in first.steps if s.stage in ("embed", "fit")} <= cached
    assert [e["metrics"] for e in second.evals] == [e["metrics"] for e in first.evals]


def test_dry_run_marks_cache_and_changing_the_method_reuses_latents(toy_run, monkeypatch):
    work, _, _ = toy_run
    monkeypatch.chdir(work)
    lines: list[str] = []
    run_pipeline("pipelines/toy.yaml", {"fit.image-text.method": "mlp",
                                        "fit.image-text.config": "pipelines/fit/mlp.yaml"},
                 dry_run=True, echo=lines.append)
    assert any(line.startswith("[embed] toy-image: cached") for line in lines)
    assert any(line.startswith("[fit] image-text: would run") for line in lines)
    assert any(line.startswith("[fit] audio-text: cached") for line in lines)


def test_changed_fit_spec_replaces_the_run_and_a_killed_fit_resumes(toy_run, monkeypatch):
    work, _, _ = toy_run
    monkeypatch.chdir(work)
    changed = {"fit.audio-text.set.epochs": "8"}
    result = run_pipeline("pipelines/toy.yaml", changed, progress=False, echo=lambda _: None)
    fits = {s.name: s for s in result.steps if s.stage == "fit"}
    assert fits["audio-text"].status == "ran" and "replace" in fits["audio-text"].detail
    assert fits["image-text"].status == "cached"
    # a run killed before it finished: no run.json, so the same plan resumes it
    (work / "runs" / "toy" / "audio-text" / "run.json").unlink()
    result = run_pipeline("pipelines/toy.yaml", changed, progress=False, echo=lambda _: None)
    fits = {s.name: s for s in result.steps if s.stage == "fit"}
    assert fits["audio-text"].status == "ran" and "resume" in fits["audio-text"].detail
    again = run_pipeline("pipelines/toy.yaml", changed, progress=False, echo=lambda _: None)
    assert all(s.status == "cached" for s in again.steps if s.stage in ("embed", "fit"))


def test_unknown_make_option_is_named_and_builder_bugs_are_not_masked(tmp_path):
    from alignpipe.app.pipeline.planning import make_manifest
    from alignpipe.util.errors import AlignpipeError

    step = {"manifest": str(tmp_path / "p.parquet"),
            "make": {"kind": "prompts", "classes": "imagenet", "tempaltes": "clip80"}}
    with pytest.raises(AlignpipeError, match=r"make prompts: unknown option\(s\) tempaltes; "
                                             r"did you mean templates\?; it takes classes, "
                                             r"templates$"):
        make_manifest(step)
    assert not (tmp_path / "p.parquet").exists()


def test_dry_run_lists_a_manifest_nothing_can_make(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_plan(tmp_path, {"data": {"gone": {"manifest": "gone.parquet"}},
                                 "embed": {"t": {"data": "gone", "encoder": "minilm"}}})
    lines: list[str] = []
    run_pipeline(path, dry_run=True, echo=lines.append)
    assert "[missing] data.gone: manifest gone.parquet does not exist" in lines[0]
    assert "[data] gone: would run  make nothing: no make block" in lines
