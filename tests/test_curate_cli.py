"""`alignpipe curate`, `alignpipe bench curate --help`, `fit --select` on the command line, and
the pipeline's `curate:` step (plan checks, a small run, its cache)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.curation_data import make_synthetic_pool
from alignpipe.app.pipeline.runner import check_plan, load_pipeline, run_pipeline
from alignpipe.curate import read_selection

runner = CliRunner()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("clipool")
    return make_synthetic_pool(out, targets=3, distractors=7, train=300, val=60, test=60), out


def test_curate_writes_the_selection_and_its_report(pool):
    data, out = pool
    sel = out / "sel" / "target.parquet"
    result = runner.invoke(app, ["curate", "--pool", str(data.store_b), "--concepts",
                                 str(data.targets), "--per-concept", "20", "--out", str(sel),
                                 "--min-rows", "25", "--no-progress"])
    assert result.exit_code == 0, result.output
    selection = read_selection(sel)
    assert len(selection) == 60 and set(selection.concepts) == set(data.target_classes)
    report = (out / "sel" / "target.md").read_text()
    assert "Coverage gaps (fewer than 25 rows)" in report
    assert all(name in report for name in data.target_classes)  # every concept is a gap
    assert (out / "sel" / "target-per-concept.png").stat().st_size > 1000
    assert (out / "sel" / "target-scores.png").stat().st_size > 1000
    assert not (out / "sel" / ".target.parquet.parts").exists()
    fit = runner.invoke(app, ["fit", str(data.store_a), str(data.store_b), "--method",
                              "linear", "--out", str(out / "run"), "--select", str(sel),
                              "--epochs", "1", "--no-progress", "--device", "cpu"])
    assert fit.exit_code == 0, fit.output
    assert yaml.safe_load((out / "run" / "config.yaml").read_text())["selections"]


@pytest.mark.parametrize("args,message", [
    (["--per-concept", "0"], "per-concept must be at least 1"),
    (["--per-concept", "5", "--concepts-from-pool"], "encoder"),
    (["--per-concept", "5", "--out-folder"], "is a folder"),
    (["--per-concept", "5", "--threshold", "0.9999"], "empty"),
])
def test_bad_inputs_are_one_line_and_write_nothing(pool, tmp_path, args, message):
    data, _ = pool
    out = tmp_path / "x.parquet"
    concepts = data.targets
    if "--concepts-from-pool" in args:
        args, concepts = ["--per-concept", "5"], data.store_a  # another encoder
    if "--out-folder" in args:
        args, out = ["--per-concept", "5"], tmp_path / "folder.parquet"
        out.mkdir()
    result = runner.invoke(app, ["curate", "--pool", str(data.store_b), "--concepts",
                                 str(concepts), "--out", str(out), "--no-progress", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.md").exists()
    assert not (tmp_path / ".x.parquet.parts").exists()


def test_bench_curate_is_a_bench_command():
    result = runner.invoke(app, ["bench", "curate", "--help"])
    assert result.exit_code == 0 and "brute-force" in result.output


def _plan(tmp_path, also: bool = False, **curate_steps):
    plan = {
        "name": "cur", "cache": str(tmp_path / "cache"), "runs": str(tmp_path / "runs"),
        "data": {"pool": {"manifest": str(tmp_path / "pool" / "pool.parquet"),
                          "make": {"kind": "toy-pool", "out": str(tmp_path / "pool"),
                                   "rows": 160, "target_fraction": 0.3}},
                 "prompts": {"manifest": str(tmp_path / "toy" / "prompts.parquet"),
                             "make": {"kind": "toy", "out": str(tmp_path / "toy"),
                                      "rows": 40}}},
        "embed": {"pool-text": {"data": "pool", "encoder": "test-text"},
                  "pool-audio": {"data": "pool", "encoder": "test-audio"},
                  "prompts-text": {"data": "prompts", "encoder": "test-text"}},
        "curate": curate_steps or {
            "target": {"pool": "pool-text", "concepts": ["prompts-text"], "per_concept": 3},
            "random": {"pool": "pool-text", "random": "target", "seed": 0}},
        "fit": {"curated": {"method": "linear", "a": "pool-audio", "b": "pool-text",
                            "set": {"epochs": 1, "batch_size": 32}, "select": "target"}},
    }
    if also:  # a second manifest trained on beside the curated pool (freeze-align's CC3M)
        plan["data"]["toy"] = {"manifest": str(tmp_path / "toy" / "toy.parquet"),
                               "make": plan["data"]["prompts"]["make"]}
        plan["embed"].update({"toy-audio": {"data": "toy", "encoder": "test-audio"},
                              "toy-text": {"data": "toy", "encoder": "test-text"}})
        plan["fit"]["curated"]["also"] = [{"a": "toy-audio", "b": "toy-text"}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_pipeline_checks_curate_steps(tmp_path):
    bad = _plan(tmp_path, target={"pool": "nope", "concepts": ["pool-text"], "per_concept": 0,
                                  "typo": 1},
                random={"pool": "pool-text", "random": "missing"})
    problems = check_plan(load_pipeline(bad))
    text = "\n".join(problems)
    assert "curate.target: pool 'nope' is not an embed step" in text
    assert "per_concept must be an integer" in text and "unknown option(s) typo" in text
    assert "curate.random: random is a row count" in text
    assert check_plan(load_pipeline(_plan(tmp_path))) == []
    plan = load_pipeline(_plan(tmp_path, also=True))
    assert check_plan(plan) == []
    plan["fit"]["curated"]["also"] = [{"a": "toy-audio", "b": "nope"}]
    assert "fit.curated: also b 'nope' is not an embed step" in "\n".join(check_plan(plan))


def test_pipeline_curate_step_feeds_fit_and_is_cached(tmp_path):
    path = _plan(tmp_path, also=True)
    lines: list[str] = []
    result = run_pipeline(path, progress=False, echo=lines.append)
    statuses = {(s.stage, s.name): s.status for s in result.steps}
    assert statuses[("curate", "target")] == "ran" and statuses[("curate", "random")] == "ran"
    target = read_selection(tmp_path / "runs" / "cur" / "curate" / "target.parquet")
    config = yaml.safe_load((tmp_path / "runs" / "cur" / "curated" / "config.yaml").read_text())
    assert config["select"][0]["rows"] == len(target)
    assert config["also"][0]["a"]["path"].endswith("test-audio")  # the second pair trained on
    log = (tmp_path / "runs" / "cur" / "curated" / "log.txt").read_text()
    assert "toy.parquet: " in log and "more training rows" in log
    assert "Trained on selections" in (tmp_path / "runs" / "cur" / "report.md").read_text()
    again = run_pipeline(path, progress=False, echo=lines.append)
    statuses = {(s.stage, s.name): s.status for s in again.steps}
    assert statuses[("curate", "target")] == "cached"
    assert statuses[("fit", "curated")] == "cached"
    spec = json.loads((tmp_path / "runs" / "cur" / "curate" / "target.spec.json").read_text())
    assert spec["options"]["per_concept"] == 3
