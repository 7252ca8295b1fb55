"""Evaluators are plug-ins: a registry dispatches `alignpipe eval <kind>` and pipeline `eval:`
entries by kind, and evaluators compute without writing (one writer makes the files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import alignpipe.evaluate.registry as registry
from alignpipe.app.results import eval_retrieval, run_evaluation, write_evaluation
from alignpipe.data.pairing import stage_two_store
from alignpipe.evaluate import (
    Evaluation,
    Table,
    compute_retrieval,
    eval_options,
    evaluate,
    evaluator_spec,
    list_evaluators,
    register_evaluator,
    result_name,
)
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry


@pytest.fixture
def evaluators(monkeypatch):
    """A private copy of the registry (built-ins included), so a test's plug-in leaves no trace."""
    fresh: Registry = Registry("evaluator")
    for name in registry.EVALUATORS:
        fresh.add(name, registry.EVALUATORS.get(name))
    monkeypatch.setattr(registry, "EVALUATORS", fresh)
    return fresh


def register_rowcount(scale_default: float = 1.0) -> None:
    """A toy evaluator: counts each store's rows and reports them times `scale`."""

    @register_evaluator("rowcount", stores=("left", "right"), options={"scale": scale_default},
                        description="rows of each store, scaled")
    def rowcount(run, left, right, *, split="test", identity=False, device=None, manifest=None,
                 allow_partial=False, scale=scale_default) -> Evaluation:
        stores = [stage_two_store(s, allow_partial=allow_partial) for s in (left, right)]
        result = {"rows": [s.rows * scale for s in stores], "scale": scale, "split": split,
                  "identity": identity}

        def made(folder: Path) -> dict:
            return {"kind": "rowcount", "split": split}

        return Evaluation(result, result_name("rowcount", split, stores, []), made, "Row count",
                          f"{len(stores)} stores.", [Table(["store", "rows"],
                                                           [["left", result["rows"][0]],
                                                            ["right", result["rows"][1]]])])


def small_stores(folder: Path) -> dict:
    from alignpipe.app.synthetic import write_store
    from alignpipe.data.manifest import write_manifest

    n = 6
    manifest = write_manifest(pa.table({"id": [f"r{i}" for i in range(n)],
                                        "image": [f"i{i}" for i in range(n)],
                                        "text": [f"t{i}" for i in range(n)],
                                        "split": ["test"] * n}), folder / "m.parquet")
    rng = np.random.default_rng(0)
    return {m: write_store(folder / f"enc-{m}", rng.standard_normal((n, 8)).astype(np.float32),
                           m, f"enc-{m}", manifest).path for m in ("image", "text")}


def test_the_builtin_evaluators_are_registered_and_listed_by_pattern():
    assert list_evaluators() == ["retrieval", "zeroshot"]
    assert list_evaluators("z*") == ["zeroshot"]
    assert evaluator_spec("retrieval").stores == ("a", "b")
    assert evaluator_spec("zeroshot").options == {"class_embedding": "mean"}
    with pytest.raises(AlignpipeError, match=r"unknown evaluator 'ranking'; known: retrieval, "
                                             r"zeroshot"):
        evaluator_spec("ranking")
    # what a pipeline eval: entry may hold, in the order the pipeline has always listed them
    assert eval_options() == ("kind", "run", "a", "b", "query", "prompts", "split", "identity",
                              "class_embedding")


def test_an_evaluator_computes_without_writing_and_the_writer_makes_the_same_files(
        tmp_path, monkeypatch):
    stores = small_stores(tmp_path / "s")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    evaluation = compute_retrieval(None, stores["image"], stores["text"], identity=True)
    assert list(work.iterdir()) == [], "computing wrote files"
    assert evaluation.result["pairs"] == 6 and "output" not in evaluation.result
    assert evaluation.figure is not None and evaluation.figure.kind == "recall_curves"
    assert evaluation.stem == "eval-retrieval-test-identity__s-enc-image__s-enc-text"

    written = eval_retrieval(None, stores["image"], stores["text"], identity=True)
    path = work / f"{evaluation.stem}.json"
    assert written["output"] == str(path) and written["produced_by"]["kind"] == "retrieval"
    evaluation.result.update(produced_by=written["produced_by"], output=written["output"])
    write_evaluation(tmp_path / "again" / "r.json", evaluation)
    again = tmp_path / "again" / "r"
    assert json.loads(again.with_suffix(".json").read_text()) == json.loads(path.read_text())
    assert again.with_suffix(".md").read_text() == path.with_suffix(".md").read_text()
    assert again.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_options_the_kind_does_not_take(tmp_path):
    stores = small_stores(tmp_path)
    with pytest.raises(AlignpipeError, match=r"eval retrieval: unknown option\(s\) "
                                             r"class_embedding"):
        run_evaluation("retrieval", None, [stores["image"], stores["text"]], identity=True,
                       class_embedding="max", output=tmp_path / "r.json")
    with pytest.raises(AlignpipeError, match=r"needs 2 stores \(a, b\), got 1"):
        evaluate("retrieval", None, [stores["image"]], identity=True)
    assert not (tmp_path / "r.json").exists()


def test_a_plugin_evaluator_runs_from_a_pipeline_with_its_options_passed_through(
        evaluators, tmp_path, monkeypatch):
    from alignpipe.app.pipeline.runner import check_plan, load_pipeline, run_pipeline

    register_rowcount()
    assert list_evaluators("row*") == ["rowcount"]
    assert {"left", "right", "scale"} <= set(eval_options())
    plan = {"name": "plug",
            "data": {"toy": {"manifest": "data/toy.parquet",
                             "make": {"kind": "toy", "out": "data", "rows": 12, "seed": 0}}},
            "embed": {"img": {"data": "toy", "encoder": "test-vit"},
                      "aud": {"data": "toy", "encoder": "test-audio"}},
            "eval": [{"kind": "rowcount", "identity": True, "left": "img", "right": "aud",
                      "split": "all", "scale": 2}]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(plan))
    monkeypatch.chdir(tmp_path)
    # a typo of the plug-in's option is refused by name; --set reaches the plug-in's option
    typo = load_pipeline(path, {"eval.0.scale": "3"})
    typo["eval"][0]["scael"] = 1
    assert any("unknown option(s) scael; did you mean scale?" in p for p in check_plan(typo))
    with pytest.raises(Exception, match="unknown key 'scael'"):
        load_pipeline(path, {"eval.0.scael": "3"})

    result = run_pipeline(path, {"eval.0.scale": "3"}, progress=False, echo=lambda _: None)
    [ev] = result.evals
    assert ev["kind"] == "rowcount" and ev["method"] == "identity"
    rows = pq.read_metadata(tmp_path / "data" / "toy.parquet").num_rows
    assert ev["metrics"]["scale"] == 3 and ev["metrics"]["rows"] == [3 * rows, 3 * rows]
    assert ev["metrics"]["split"] == "all" and ev["metrics"]["identity"] is True
    assert Path(ev["output"]) == Path("runs/plug/evals/00-rowcount-identity.json")
    out = tmp_path / ev["output"]
    assert json.loads(out.read_text())["produced_by"] == {"kind": "rowcount", "split": "all"}
    assert out.with_suffix(".md").read_text().startswith(
        "# Row count: identity (stores already share a space)")
    assert not out.with_suffix(".png").exists()  # no figure asked for, none drawn


def test_the_cli_eval_commands_dispatch_through_the_registry(evaluators, tmp_path, monkeypatch):
    """`alignpipe eval retrieval` runs whatever the registry holds as retrieval."""
    from alignpipe.app.cli import app

    stores = small_stores(tmp_path)
    real = evaluators.get("retrieval")
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real.compute(*args, **kwargs)

    evaluators._entries["retrieval"] = registry.EvaluatorSpec(
        "retrieval", spy, real.stores, real.options, real.description)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["eval", "retrieval", str(stores["image"]),
                                   str(stores["text"]), "--identity", "--split", "all"])
    assert out.exit_code == 0, out.output
    assert seen["split"] == "all" and seen["identity"] is True
    written = sorted(p.name for p in tmp_path.glob("eval-retrieval-all-identity__*"))
    assert [Path(n).suffix for n in written] == [".json", ".md", ".png"]


def test_a_plugin_evaluator_is_an_eval_command_with_its_options(evaluators, tmp_path):
    """`alignpipe eval <kind>` exists for a registered kind with no hand-written command."""
    from alignpipe.app.cli import app

    register_rowcount()
    stores = small_stores(tmp_path)
    cli = CliRunner()
    assert "rowcount" in cli.invoke(app, ["eval", "--help"]).output
    out = cli.invoke(app, ["eval", "rowcount", str(stores["image"]), str(stores["text"]),
                           "--identity", "--split", "all", "--scale", "2.5",
                           "--output", str(tmp_path / "rc.json")])
    assert out.exit_code == 0, out.output
    assert "scale: 2.5" in out.output and "rc.json" in out.output
    written = json.loads((tmp_path / "rc.json").read_text())
    assert written["rows"] == [15.0, 15.0] and written["split"] == "all"
    refused = cli.invoke(app, ["eval", "rowcount", str(stores["image"]), str(stores["text"]),
                               "--scael", "2"])
    assert refused.exit_code != 0 and "--scael" in refused.output
