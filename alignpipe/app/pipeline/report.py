"""The report a pipeline run leaves behind: ``report.md`` plus the plots its steps drew."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from alignpipe.app.render import markdown_table
from alignpipe.util.fsutil import atomic_write_text

if TYPE_CHECKING:
    from alignpipe.app.pipeline.runner import PipelineResult


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """``{"image_to_text": {"R@1": 5.0}}`` -> ``{"image_to_text.R@1": 5.0}``; numbers only."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if key in ("per_class", "per_class_accuracy"):
                continue  # one line per class would drown the table
            flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The metrics worth a table row: top-1/top-5 accuracy and Recall@K."""
    return {k: v for k, v in flatten_metrics(metrics).items()
            if k in ("top1", "top5") or "R@" in k}


def _encoders(names: Iterable[object] | None) -> str:
    return " ↔ ".join(str(n) for n in names or []) or "?"


def headline_rows(plan: dict, evals: list[dict]) -> list[list]:
    """One row per (eval, run, metric): ours, and the paper's number where the plan gives one.

    An eval of a fit step that lists several methods has a row per method, so the methods
    sit side by side under the same eval index and reference.
    """
    references = defaultdict(list)
    for ref in plan.get("reference", []):
        references[(int(ref.get("eval", -1)), str(ref.get("metric")))].append(ref)
    rows = []
    for ev in evals:
        for metric, value in headline_metrics(ev["metrics"]).items():
            refs = references.get((ev["index"], metric), [])
            paper = "; ".join(f"{r['value']} ({r.get('source', '?')})" for r in refs) or "–"
            rows.append([ev["index"], ev["kind"], ev["run"] or "identity",
                         ev.get("method", "?"), _encoders(ev.get("encoders")), ev["split"],
                         metric, value, paper])
    return rows


def run_rows(runs: list[dict]) -> list[list]:
    """One row per fit run: its folder, method, and the stores and encoders it aligned."""
    return [[r["run"], r["method"], f"{r['a']} ({r['encoders'][0]})",
             f"{r['b']} ({r['encoders'][1]})", r["folder"]] for r in runs]


def run_plots(result: PipelineResult) -> list[str]:
    """The plots this pipeline run drew, relative to its folder: each fit's curves, each eval's
    plot and the similarity heatmap. Not every PNG under the folder: one left by an earlier
    plan (another method, an eval since removed) or by a hand-run `alignpipe eval` would be
    shown as if it were this run's."""
    folder = Path(result.folder).resolve()
    candidates = [Path(r["folder"]) / "curves.png" for r in getattr(result, "runs", None) or []]
    candidates += [Path(ev["output"]).with_suffix(".png") for ev in result.evals
                   if ev.get("output")]
    if result.similarity:
        candidates.append(folder / "similarity.png")
    plots = []
    for path in candidates:
        path = path.resolve()
        if path.is_file() and path.is_relative_to(folder):
            plots.append(str(path.relative_to(folder)))
    return list(dict.fromkeys(plots))


def write_report(plan: dict, result: PipelineResult, wall_s: float) -> Path:
    folder = Path(result.folder)
    lines = [f"# Pipeline `{result.name}`", "",
             f"`alignpipe run {plan.get('_file')}` — finished "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} in {wall_s:.1f} s.", ""]

    per_stage: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for step in result.steps:
        per_stage[step.stage][0] += step.seconds
        per_stage[step.stage][1 if step.status == "ran" else 2] += 1
    lines += ["## Stages", "", markdown_table(
        ["stage", "ran", "from cache", "wall time (s)"],
        [[stage, int(ran), int(cached), secs] for stage, (secs, ran, cached)
         in per_stage.items()]), ""]
    lines += ["## Steps", "", markdown_table(
        ["stage", "step", "status", "seconds", "detail"],
        [[s.stage, s.name, s.status, s.seconds, s.detail] for s in result.steps]), ""]

    runs = getattr(result, "runs", None) or []
    if runs:
        lines += ["## Runs", "", markdown_table(
            ["run", "method", "a (encoder)", "b (encoder)", "folder"], run_rows(runs)), ""]
        selected = [r for r in runs if r.get("select")]
        if selected:  # fits trained on curated (or random) selections of their pool
            lines += ["Trained on selections: " + "; ".join(
                f"{r['run']} ← {', '.join(r['select'])}" for r in selected) + ".", ""]
    rows = headline_rows(plan, result.evals)
    if rows:
        lines += ["## Results", "", "Recall and accuracy in percent; encoders are those of the "
                  "stores the eval scored.", "", markdown_table(
                      ["eval", "kind", "run", "method", "encoders", "split", "metric", "ours",
                       "paper"], rows), ""]
    if result.similarity:
        sim = result.similarity
        names = [Path(s).name for s in sim.get("stores", [])]
        for key in ("linear_cka", "mutual_knn"):
            if key in sim:
                lines += [f"## {key.replace('_', ' ')}", "", markdown_table(
                    ["", *names], [[n, *row] for n, row in zip(names, sim[key], strict=False)]),
                    ""]
    plots = run_plots(result)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
