"""Where an evaluation's result is written: the JSON, a markdown report and a PNG beside it.

Evaluators compute and return an `Evaluation`; this module is the one place that turns one into
files (atomic writes; matplotlib only when a figure is drawn).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from alignpipe.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # evaluate.registry calls this module: no import back at run time
    from alignpipe.evaluate.registry import Evaluation


def _recall_curves(path: Path, data: dict, title: str) -> None:
    from alignpipe.render import plot_recall_curves

    plot_recall_curves(path, data["curves"], title)


def _confusion(path: Path, data: dict, title: str) -> None:
    from alignpipe.render import plot_confusion

    plot_confusion(path, data["matrix"], data["names"], title)


#: Figure kinds an evaluation may ask for: ``draw(png_path, data, title)``.
FIGURES: dict[str, Callable[[Path, dict, str], None]] = {
    "recall_curves": _recall_curves,
    "confusion": _confusion,
}


def header_lines(result: dict, title: str) -> list[str]:
    """The top of an eval report: what was scored (run and heads sha256), then any warnings."""
    source = result.get("run") or "identity (stores already share a space)"
    lines = [f"# {title}: {source}", ""]
    if result.get("heads"):
        lines += [f"Method {result['method']}; {result['heads']['file']} sha256 "
                  f"{str(result['heads']['sha256'])[:16]}….", ""]
    lines += [f"**Warning:** {w}" for w in result.get("warnings", [])]
    return lines + ([""] if result.get("warnings") else [])


def evaluation_markdown(evaluation: Evaluation) -> str:
    """The markdown report: header, summary sentence, then each table (under its heading)."""
    from alignpipe.render import markdown_table

    lines = [*header_lines(evaluation.result, evaluation.title), evaluation.summary, ""]
    for table in evaluation.tables:
        if table.heading:
            lines += [f"## {table.heading}", ""]
        lines += [markdown_table(table.header, table.rows), ""]
    return "\n".join(lines)


def write_evaluation(path: str | Path, evaluation: Evaluation) -> None:
    """Write `evaluation.result` to `path` (JSON), its report to ``.md`` and its figure (if
    any) to ``.png`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, evaluation.result)
    atomic_write_text(path.with_suffix(".md"), evaluation_markdown(evaluation))
    figure = evaluation.figure
    if figure is not None:
        if figure.kind not in FIGURES:
            known = ", ".join(FIGURES)
            raise ValueError(f"unknown figure kind {figure.kind!r}; known: {known}")
        FIGURES[figure.kind](path.with_suffix(".png"), figure.data, figure.title)
