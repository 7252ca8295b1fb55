"""Manifest builders are plug-ins: one declaration of options makes both the `alignpipe manifest
<kind>` command and the pipeline's `make: {kind: ...}` block.

The builder below is registered here, in the test file, and nowhere else: it must be reachable
through the real command line and the real pipeline with no other file touched.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data.builders import BuildResult, list_builders
from alignpipe.data.builders.registry import OUT, Option, builder_spec, register_builder
from alignpipe.data.manifest import read_manifest, write_manifest
from alignpipe.util.errors import AlignpipeError

KIND = "echo-lines"


@register_builder(KIND, source="source", where_to_get="any text file, one caption a line",
                  options=(
    Option("source", Path, positional=True, exists=True, help="A text file, one caption a line."),
    OUT,
    Option("repeat", int, 1, "Rows per line."),
    Option("prefix", str, "", "Put before every caption."),
    Option("upper", bool, False, "Upper-case the captions.")))
def _echo_lines(source, out, repeat, prefix, upper):
    """Test plug-in: one text row per line of SOURCE (times --repeat)."""
    lines = [line for line in Path(source).read_text().splitlines() if line]
    texts = [f"{prefix}{line.upper() if upper else line}" for line in lines for _ in range(repeat)]
    write_manifest(pa.table({"id": [f"{i:04d}" for i in range(len(texts))], "text": texts}), out)
    return BuildResult(Path(out), len(texts), {})


@pytest.fixture
def lines(tmp_path) -> Path:
    path = tmp_path / "lines.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def test_the_shipped_builders_are_registered_and_listed_with_wildcards():
    assert {"toy", "imagenet", "prompts", "coco", "flickr30k", "cc3m", "cc12m", "webdataset",
            "audiocaps", "clotho", "folder", "split"} <= set(list_builders())
    assert list_builders("c*") == ["cc12m", "cc3m", "clotho", "coco"]
    assert KIND in list_builders("echo-*")
    with pytest.raises(AlignpipeError, match=r"unknown manifest builder 'nope'; known: "):
        builder_spec("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_builder(KIND, options=(OUT,))(_echo_lines)


def test_a_registered_builder_is_a_manifest_command_with_its_declared_options(lines, tmp_path):
    runner = CliRunner()
    listing = runner.invoke(app, ["manifest", "--help"], env={"COLUMNS": "200"})
    assert KIND in listing.output and "Test plug-in: one text row per line" in listing.output
    helped = runner.invoke(app, ["manifest", KIND, "--help"], env={"COLUMNS": "200"})
    for text in ("--repeat", "Rows per line.", "--prefix", "--upper", "--no-upper",
                 "A text file, one caption a line."):
        assert text in helped.output
    out = tmp_path / "m.parquet"
    result = runner.invoke(app, ["manifest", KIND, str(lines), str(out), "--repeat", "2",
                                 "--prefix", "> ", "--upper"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out).column("text") == ["> A RED CIRCLE"] * 2 + ["> A BLUE SQUARE"] * 2
    assert f"wrote {out} (4 rows)" in result.output.replace("\n", "")
    wrong = runner.invoke(app, ["manifest", KIND, str(lines), str(out), "--repeta", "2"])
    assert wrong.exit_code != 0 and "No such option: --repeta" in wrong.output


def _plan(tmp_path: Path, make: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "cache": str(tmp_path / "cache"), "runs": str(tmp_path / "runs"),
        "data": {"d": {"manifest": str(tmp_path / "made.parquet"), "make": make}},
        "embed": {"t": {"data": "d", "encoder": "test-text"}}}))
    return path


def test_a_registered_builder_runs_from_a_pipeline_make_block(lines, tmp_path):
    from alignpipe.app.pipeline.planning import make_manifest, make_source_problems
    from alignpipe.app.pipeline.runner import check_plan, load_pipeline, run_pipeline

    make = {"kind": KIND, "source": str(lines), "repeat": "3", "upper": True}
    path = _plan(tmp_path, make)
    plan = load_pipeline(path)
    assert check_plan(plan) == []
    said: list[str] = []
    run_pipeline(path, dry_run=True, echo=said.append)
    assert f"[data] d: would run  make {KIND}" in said
    # what `alignpipe run` calls for the data step (the embed step after it is not this test's)
    # --set gives text: "3" is coerced to the declared int
    assert make_manifest(plan["data"]["d"]) == tmp_path / "made.parquet"
    assert read_manifest(tmp_path / "made.parquet").column("text") == (
        ["A RED CIRCLE"] * 3 + ["A BLUE SQUARE"] * 3)
    # a missing source is named with where to get it, before anything runs
    assert make_source_problems({"kind": KIND, "source": str(tmp_path / "gone.txt")}) == [
        f"{tmp_path / 'gone.txt'} does not exist: any text file, one caption a line"]
    assert make_source_problems({"kind": KIND}) == [
        f"make {KIND} needs 'source' (any text file, one caption a line)"]


def test_unknown_make_options_and_kinds_are_refused_by_name_with_close_matches(lines, tmp_path):
    from alignpipe.app.pipeline.runner import check_plan, load_pipeline

    plan = load_pipeline(_plan(tmp_path, {"kind": KIND, "source": str(lines), "repaet": 2}))
    assert check_plan(plan) == [
        f"data.d: make {KIND}: unknown option(s) repaet; did you mean repeat?; it takes prefix, "
        f"repeat, source, upper"]
    plan = load_pipeline(_plan(tmp_path, {"kind": "echo-line", "source": str(lines)}))
    [problem] = check_plan(plan)
    assert problem.startswith(f"data.d: unknown make kind 'echo-line'; did you mean {KIND}?; "
                              f"use one of ")
    # `out` is the step's manifest, not an option of a manifest-writing builder
    plan = load_pipeline(_plan(tmp_path, {"kind": KIND, "source": str(lines), "out": "x"}))
    assert "unknown option(s) out" in check_plan(plan)[0]


def test_make_values_are_checked_against_the_declared_types(lines, tmp_path):
    from alignpipe.app.pipeline.planning import make_manifest

    step = {"manifest": str(tmp_path / "m.parquet"),
            "make": {"kind": KIND, "source": str(lines), "repeat": "many"}}
    with pytest.raises(AlignpipeError, match=rf"make {KIND}: repeat must be int, got 'many'"):
        make_manifest(step)
    step["make"] = {"kind": KIND, "source": str(lines), "upper": "maybe"}
    with pytest.raises(AlignpipeError, match=rf"make {KIND}: upper must be bool, got 'maybe'"):
        make_manifest(step)
    assert not (tmp_path / "m.parquet").exists()


def test_shipped_builders_keep_their_older_make_keys(tmp_path):
    from alignpipe.app.pipeline.planning import make_manifest, make_option_problems

    # prompts took template_set (its function's name) as well as templates
    assert make_option_problems({"kind": "prompts", "template_set": "photo"}) == []
    out = tmp_path / "prompts.parquet"
    make_manifest({"manifest": str(out), "make": {"kind": "prompts", "template_set": "photo"}})
    assert len(read_manifest(out).column("id")) == 1000
    # webdataset's main input is `source` in a make block (`shards` on the command line)
    assert make_option_problems({"kind": "webdataset", "source": "x/{0..1}.tar"}) == []
    # `check: skip|off` (the builder functions' policy) is still taken by make blocks
    assert make_option_problems({"kind": "cc3m", "source": "x.tsv", "check": "off"}) == []
    assert "unknown option(s) check" in make_option_problems(
        {"kind": "prompts", "check": "off"})[0]


def test_a_mistyped_check_policy_is_refused_not_read_as_skip(tmp_path):
    from alignpipe.app.pipeline.planning import make_manifest

    step = {"manifest": str(tmp_path / "m.parquet"),
            "make": {"kind": "folder", "source": str(tmp_path), "check": "of"}}
    with pytest.raises(AlignpipeError, match="check 'of' is not one of error, skip, off"):
        make_manifest(step)
    assert not (tmp_path / "m.parquet").exists()
