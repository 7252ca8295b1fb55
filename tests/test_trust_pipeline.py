"""Issue 8, pipeline items: typed `set:` values (6), refused overrides, bounded YAML and plain
names (23), and several methods side by side in one pipeline and report (24)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.pipeline.runner import (
    PipelineError,
    check_plan,
    fit_runs,
    load_pipeline,
    run_pipeline,
)
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.names import plain_name
from alignpipe.util.yamlsafe import YamlInputError, load_yaml

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "pipelines" / "toy.yaml"
runner = CliRunner()

BILLION_LAUGHS = "".join(
    [f'a: &a [{",".join(["lol"] * 9)}]\n']
    + [f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n"
       for p, n in zip("abcdefgh", "bcdefghi", strict=True)])


def write_plan(tmp_path: Path, plan: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def small_plan(**fit) -> dict:
    return {"name": "x", "data": {"d": {"manifest": "m.parquet"}},
            "embed": {"img": {"data": "d", "encoder": "test-vit"},
                      "aud": {"data": "d", "encoder": "test-audio"}},
            "fit": {"f": {"a": "img", "b": "aud", **fit}},
            "eval": [{"kind": "retrieval", "run": "f", "a": "img", "b": "aud"}]}


# ---- item 6: `set:` values keep their YAML types ------------------------------------------------
def test_set_values_reach_the_fit_with_their_yaml_types(tmp_path):
    from alignpipe.fit.config import resolve_config
    from alignpipe.methods import create_method

    path = tmp_path / "p.yaml"
    path.write_text(
        "data: {d: {manifest: m.parquet}}\n"
        "embed: {img: {data: d, encoder: test-vit}, aud: {data: d, encoder: test-audio}}\n"
        "fit:\n"
        "  f:\n"
        "    method: linear\n"
        "    a: img\n"
        "    b: aud\n"
        "    set: {identity_side: null, out_dim: null, epochs: 3, standardize: true, lr: 0.002}\n")
    plan = load_pipeline(path)
    assert check_plan(plan) == []
    overrides = fit_runs(plan, "f")[0].overrides
    assert overrides == {"identity_side": None, "out_dim": None, "epochs": 3,
                         "standardize": True, "lr": 0.002}
    assert [type(overrides[k]) for k in ("epochs", "standardize", "lr")] == [int, bool, float]
    cfg = resolve_config("linear", None, overrides)
    assert cfg["identity_side"] is None and cfg["out_dim"] is None
    create_method("linear", cfg, 8, 6)  # "None" (a string) made this fail before
    # `--set k=v` on the command line gives the same values as `k: v` in the file
    cli = load_pipeline(write_plan(tmp_path, small_plan(method="linear"), "q.yaml"), {
        "fit.f.set.identity_side": "null", "fit.f.set.out_dim": "null", "fit.f.set.epochs": "3",
        "fit.f.set.standardize": "true", "fit.f.set.lr": "0.002"})
    assert fit_runs(cli, "f")[0].overrides == overrides


# ---- item 23: every override names a key the pipeline has or allows ------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("fit.image-text.epochz", "5", r"unknown key 'epochz'; did you mean fit.image-text.set.epochs"),
    ("fit.image-text.epochs", "5", r"fit config keys go under set: fit.image-text.set.epochs"),
    ("nonsense.key", "1", r"unknown section 'nonsense'"),
    ("fit.image-txt.method", "mlp", r"no fit step 'image-txt'; did you mean image-text"),
    ("embed.toy-image.colum", "text", r"unknown key 'colum'; did you mean column"),
    ("eval.0.splt", "val", r"unknown key 'splt'; did you mean split"),
    ("eval.9.split", "val", r"'9' is not an index of a list of 4"),
    ("x-toy-fit.epochs", "3", r"`x-` keys only hold YAML anchors"),
    ("similarity.sampel", "10", r"did you mean sample"),
])
def test_an_override_of_no_existing_key_is_refused(key, value, message):
    with pytest.raises(PipelineError, match=message):
        load_pipeline(TOY, {key: value})


def test_config_keys_under_set_are_checked_for_the_steps_method():
    problems = check_plan(load_pipeline(TOY, {"fit.image-text.set.epochz": "5"}))
    assert len(problems) == 1
    assert "fit.image-text: set: unknown key 'epochz' for method fusemix" in problems[0]
    assert "did you mean epochs?" in problems[0]
    # the same key is fine for a method that has it
    assert check_plan(load_pipeline(TOY, {"fit.image-text.method": "linear",
                                          "fit.image-text.config": "pipelines/fit/linear.yaml",
                                          "fit.image-text.set": "{identity_side: a}"})) == []


def test_an_unknown_make_toy_option_is_refused_before_anything_runs():
    problems = check_plan(load_pipeline(TOY, {"data.toy.make.rowz": "5"}))
    assert problems == ["data.toy: make toy: unknown option(s) rowz; did you mean rows?; it "
                        "takes captions_per_item, out, rows, seed"]


def test_a_set_that_is_not_a_mapping_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    problems = check_plan(load_pipeline(TOY, {"fit.image-text.set": "5"}))
    assert problems == ["fit.image-text: set must be a mapping of fit config keys, got 5"]
    result = runner.invoke(app, ["run", str(TOY), "--dry-run", "--set", "fit.image-text.set=5"])
    assert result.exit_code == 2, result.output
    assert "set must be a mapping" in result.output and "Traceback" not in result.output


def test_unknown_fit_and_eval_options_in_the_file_are_refused(tmp_path):
    plan = small_plan(method="linear", epochs=3)
    plan["eval"][0]["spilt"] = "val"
    problems = "\n".join(check_plan(load_pipeline(write_plan(tmp_path, plan))))
    assert "fit.f: unknown option(s) epochs" in problems
    assert "eval.0: unknown option(s) spilt; did you mean split?" in problems


# ---- item 23: YAML aliases are bounded ----------------------------------------------------------
def test_billion_laughs_is_refused_in_well_under_a_second(tmp_path):
    path = tmp_path / "lol.yaml"
    path.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 500
    started = time.perf_counter()
    with pytest.raises(AlignpipeError, match=r"aliases expand to more than 100,000 values"):
        load_pipeline(path)
    flow = "{" + ", ".join(BILLION_LAUGHS.splitlines()) + "}"  # the same, as one --set value
    with pytest.raises(YamlInputError, match=r"--set name: refused"):
        load_pipeline(TOY, {"name": flow})
    assert time.perf_counter() - started < 2.0
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2 and "lol.yaml: refused" in result.output
    assert "Traceback" not in result.output


def test_load_yaml_bounds_refuses_cycles_and_names_the_line():
    assert load_yaml("a: &x [1, 2]\nb: [*x, *x]") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    with pytest.raises(YamlInputError, match=r"more than 10 values"):
        load_yaml("a: &x [1, 2, 3]\nb: [*x, *x, *x]", max_nodes=10)
    with pytest.raises(YamlInputError, match=r"recursive"):
        load_yaml("a: &x [1, *x]", "cfg.yaml")
    with pytest.raises(YamlInputError, match=r"^cfg.yaml: not valid YAML: line 2, column"):
        load_yaml("a: 1\nb: c: d\n", "cfg.yaml")
    with pytest.raises(YamlInputError, match=r"python/object"):
        load_yaml("!!python/object/apply:os.system ['true']", "cfg.yaml")
    shipped = sorted((REPO / "pipelines").rglob("*.yaml"))
    assert shipped and all(load_yaml(p) == yaml.safe_load(p.read_text()) for p in shipped)


# ---- item 23: names stay inside the cache and runs folders ---------------------------------------
@pytest.mark.parametrize("override, message", [
    ({"name": "../../.."}, "name '../../..' must be a plain name"),
    ({"embed.img.dataset": "../../x"}, "embed.img: dataset '../../x' must be a plain name"),
    ({"name": "a/b"}, "name 'a/b' must be a plain name"),
])
def test_names_that_leave_their_folder_are_refused(tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    path = write_plan(tmp_path, small_plan(method="linear"))
    with pytest.raises(PipelineError, match=message):
        run_pipeline(path, override, echo=lambda _: None)
    assert not any(tmp_path.parent.glob("x")) and sorted(tmp_path.iterdir()) == [path]


def test_a_fit_id_that_leaves_the_runs_folder_is_refused(tmp_path):
    plan = small_plan(method="linear")
    plan["fit"] = {"../escape": plan["fit"]["f"]}
    plan["eval"] = []
    problems = check_plan(load_pipeline(write_plan(tmp_path, plan)))
    assert any("the fit id '../escape' must be a plain name" in p for p in problems)
    assert plain_name("toy-image", "x") == "toy-image"
    with pytest.raises(AlignpipeError, match=r"dataset '\.\.' must be a plain name"):
        plain_name("..", "dataset")


# ---- item 24: several methods side by side ------------------------------------------------------
def test_a_fit_step_listing_methods_gets_one_folder_per_method():
    plan = load_pipeline(TOY, {"fit.image-text.method": "[fusemix, mlp]",
                               "fit.image-text.set.mlp": "{dropout: 0.1}"})
    assert check_plan(plan) == []
    runs = fit_runs(plan, "image-text")
    assert [(r.method, r.folder, r.config) for r in runs] == [
        ("fusemix", "image-text-fusemix", "pipelines/fit/fusemix.yaml"),
        ("mlp", "image-text-mlp", "pipelines/fit/mlp.yaml")]
    assert "dropout" not in runs[0].overrides and runs[1].overrides["dropout"] == 0.1
    assert runs[0].overrides["epochs"] == runs[1].overrides["epochs"] == 40
    assert [r.folder for r in fit_runs(plan, "audio-text")] == ["audio-text"]
    # a config file that names one method cannot serve two
    bad = load_pipeline(TOY, {"fit.image-text.method": "[fusemix, mlp]",
                              "fit.image-text.config": "pipelines/fit/fusemix.yaml"})
    assert any("fit config is for method 'fusemix'" in p for p in check_plan(bad))


def test_run_folders_of_two_steps_may_not_collide(tmp_path):
    plan = small_plan(method=["linear", "mlp"])
    plan["fit"]["f-mlp"] = {"method": "mlp", "a": "img", "b": "aud"}
    problems = check_plan(load_pipeline(write_plan(tmp_path, plan)))
    assert any("run folder f-mlp is also the folder of fit.f" in p for p in problems)


TINY = {
    "name": "tiny",
    "data": {"toy": {"manifest": "data/toy.parquet",
                     "make": {"kind": "toy", "out": "data", "rows": 80, "seed": 0}}},
    "embed": {"img": {"data": "toy", "encoder": "test-vit"},
              "aud": {"data": "toy", "encoder": "test-audio"}},
    "fit": {"pair": {"method": ["linear", "mlp"], "a": "img", "b": "aud",
                     "set": {"epochs": 2, "batch_size": 16, "warmup_steps": 1,
                             "mlp": {"blocks": 1, "expansion": 1, "out_dim": 16}}}},
    "eval": [{"kind": "retrieval", "run": "pair", "a": "img", "b": "aud", "split": "test"}],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import os

    work = tmp_path_factory.mktemp("tiny")
    path = write_plan(work, TINY)
    old = os.getcwd()
    os.chdir(work)
    try:
        result = run_pipeline(path, progress=False, echo=lambda _: None)
    finally:
        os.chdir(old)
    return work, path, result


def test_two_methods_of_one_step_are_fitted_scored_and_reported_apart(tiny_run):
    work, _, result = tiny_run
    folders = {s.name: s for s in result.steps if s.stage == "fit"}
    assert set(folders) == {"pair-linear", "pair-mlp"}
    for method in ("linear", "mlp"):
        config = yaml.safe_load((work / "runs" / "tiny" / f"pair-{method}" / "config.yaml")
                                .read_text())
        assert config["method"] == method
    assert [(e["run"], e["method"], e["encoders"]) for e in result.evals] == [
        ("pair-linear", "linear", ["test-vit", "test-audio"]),
        ("pair-mlp", "mlp", ["test-vit", "test-audio"])]
    outputs = {e["output"] for e in result.evals}
    assert len(outputs) == 2 and all((work / o).exists() for o in outputs)
    report = (work / "runs" / "tiny" / "report.md").read_text()
    assert "| pair-linear | linear | img (test-vit) | aud (test-audio) |" in report
    assert "| 0 | retrieval | pair-mlp | mlp | test-vit ↔ test-audio | test |" in report
    saved = json.loads((work / "runs" / "tiny" / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["linear", "mlp"]


def test_changing_one_methods_spec_replaces_only_its_run(tiny_run, monkeypatch):
    work, path, _ = tiny_run
    monkeypatch.chdir(work)
    lines: list[str] = []
    run_pipeline(path, {"fit.pair.set.mlp.epochs": "3"}, dry_run=True, echo=lines.append)
    assert any(line.startswith("[fit] pair-linear: cached") for line in lines)
    assert any(line.startswith("[fit] pair-mlp: would run") and "replace a run made with "
               "another spec" in line for line in lines)
    assert (work / "runs" / "tiny" / "pair-mlp" / "run.json").exists()  # a dry run keeps it


def test_replacing_a_run_by_another_method_says_so(tiny_run, tmp_path, monkeypatch):
    import shutil

    work, _, _ = tiny_run
    monkeypatch.chdir(work)
    shared = {k: v for k, v in TINY["fit"]["pair"]["set"].items() if k != "mlp"}
    plan = {**TINY, "name": "single",
            "fit": {"pair": {**TINY["fit"]["pair"], "method": "linear", "set": shared}}}
    path = write_plan(tmp_path, plan)
    shutil.copytree(work / "runs" / "tiny" / "pair-linear", work / "runs" / "single" / "pair")
    lines: list[str] = []
    run_pipeline(path, dry_run=True, echo=lines.append)
    assert any(line.startswith("[fit] pair: cached") for line in lines), lines
    lines.clear()
    run_pipeline(path, {"fit.pair.method": "mlp"}, dry_run=True, echo=lines.append)
    [line] = [line for line in lines if line.startswith("[fit] pair:")]
    assert "would run" in line and "replace the linear run" in line
    assert "method: [linear, mlp]" in line


def test_the_report_shows_this_runs_plots_not_every_png_in_the_folder(tiny_run, monkeypatch):
    from alignpipe.app.pipeline.report import write_report

    work, path, result = tiny_run
    monkeypatch.chdir(work)
    stale = work / "runs" / "tiny" / "evals" / "00-retrieval-pair.png"  # an earlier plan's
    stale.write_bytes(b"\x89PNG")
    report = write_report(load_pipeline(path), result, 1.0).read_text()
    assert "(evals/00-retrieval-pair-mlp.png)" in report
    assert "(evals/00-retrieval-pair-linear.png)" in report
    assert "00-retrieval-pair.png" not in report
    # each fit's curves, drawn by the CurvesPNG callback the pipeline registers
    assert (work / "runs" / "tiny" / "pair-mlp" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "(pair-mlp/curves.png)" in report and "(pair-linear/curves.png)" in report
