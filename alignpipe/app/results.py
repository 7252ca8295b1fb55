"""Where results are written: an evaluation's JSON with a markdown report and a PNG beside it,
and a similarity matrix's JSON with its heatmaps.

The core's evaluators and `similarity` compute and return; this module is the one place that
turns their results into files (atomic writes; matplotlib only when a figure is drawn).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.data.pairing import ManifestArg
from alignpipe.evaluate import Evaluation, evaluate, output_path
from alignpipe.evaluate.similarity import similarity
from alignpipe.util.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from alignpipe.data.store import LatentStore

    StoreArg = str | Path | LatentStore


def _recall_curves(path: Path, data: dict, title: str) -> None:
    from alignpipe.app.render import plot_recall_curves

    plot_recall_curves(path, data["curves"], title)


def _confusion(path: Path, data: dict, title: str) -> None:
    from alignpipe.app.render import plot_confusion

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
    from alignpipe.app.render import markdown_table

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


def run_evaluation(kind: str, run: str | Path | None, stores: list[StoreArg], *,
                   output: str | Path | None = None, **options: Any) -> dict:
    """Run the evaluator `kind` (`alignpipe.evaluate.evaluate`) and write its result; returns
    the result.

    It goes to `output` (default: ``{stem}.json`` in the run folder, or here without a run)
    with a markdown report and a plot beside it; a default-named file that holds another
    eval's result is refused, not replaced.
    """
    evaluation = evaluate(kind, run, stores, **options)
    path, produced_by = output_path(output, run, evaluation.stem, evaluation.produced_by)
    evaluation.result.update({"produced_by": produced_by, "output": str(path)})
    write_evaluation(path, evaluation)
    return evaluation.result


def eval_retrieval(run: str | Path | None, store_a: StoreArg, store_b: StoreArg, *,
                   split: str = "test", identity: bool = False,
                   output: str | Path | None = None, device: str | None = None,
                   manifest: ManifestArg = None,
                   allow_partial: bool = False) -> dict:
    """Retrieval between two stores (`alignpipe.evaluate.compute_retrieval`), written to
    `output` (a JSON, with a markdown table and a recall plot beside it); returns the result."""
    return run_evaluation("retrieval", run, [store_a, store_b], output=output, split=split,
                          identity=identity, device=device, manifest=manifest,
                          allow_partial=allow_partial)


def eval_zeroshot(run: str | Path | None, query_store: StoreArg, prompts_store: StoreArg, *,
                  split: str = "test", class_embedding: str = "mean", identity: bool = False,
                  output: str | Path | None = None, device: str | None = None,
                  manifest: ManifestArg = None, allow_partial: bool = False) -> dict:
    """Zero-shot classification (`alignpipe.evaluate.compute_zeroshot`), written to `output`
    (a JSON, with a markdown table and, up to CONFUSION_MAX_CLASSES classes, a confusion plot
    beside it); returns the result."""
    return run_evaluation("zeroshot", run, [query_store, prompts_store], output=output,
                          split=split, class_embedding=class_embedding, identity=identity,
                          device=device, manifest=manifest, allow_partial=allow_partial)


def write_similarity(path: str | Path, result: dict) -> None:
    """Write a `similarity` result to `path` (JSON) and its two heatmaps to ``.png`` beside it."""
    from alignpipe.app.render import plot_similarity

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    plot_similarity(path.with_suffix(".png"), result["names"],
                    {"linear_cka": result["linear_cka"],
                     f"mutual_knn (k={result['k']})": result["mutual_knn"]})


def similarity_to(path: str | Path | None, stores: list, **options) -> dict:
    """`similarity(stores, **options)`, written with `write_similarity` when `path` is given."""
    result = similarity(stores, **options)
    if path is not None:
        write_similarity(path, result)
    return result
