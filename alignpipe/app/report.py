"""Human-readable output: rich tables for the terminal, markdown for files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

# Markdown tables and PNG figures live in `render` (no rich); re-exported here as before.
from alignpipe.app.render import (  # noqa: F401
    markdown_table,
    plot_confusion,
    plot_fit_curves,
    plot_recall_curves,
    plot_similarity,
)

if TYPE_CHECKING:
    from alignpipe.app.pipeline.runner import PipelineResult


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def store_info_table(details: dict) -> Table:
    """`alignpipe info` as a two-column table."""
    table = Table(title=details["path"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    encoder = details.get("encoder", {})
    manifest = details.get("manifest", {})
    provenance = ", ".join(f"{k}={v}" for k, v in encoder.items()
                           if k not in ("name", "dim") and v not in (None, "", {}))
    rows = [
        ("rows", f"{details['rows']:,}"),
        ("dim", str(details["dim"])),
        ("dtype", details["dtype"]),
        ("valid", f"{details['valid']:,} ({details['failures']} recorded failures)"),
        ("modality", details["modality"]),
        ("encoder", f"{encoder.get('name', '?')}  ({provenance})"),
        ("manifest", f"{manifest.get('path')}  sha256 {str(manifest.get('sha256'))[:16]}…  "
                     f"{manifest.get('rows')} rows"),
        ("units done", f"{details['units_done']} / {details['units_total']} "
                       f"({details['unit_rows']} rows each)"),
        ("chunks/shards", f"{tuple(details['chunks'])} in {tuple(details['shards'])}"),
        ("size on disk", human_bytes(details["size_bytes"])),
        ("created", f"{details.get('created')} by alignpipe {details.get('alignpipe_version')}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def results_table(result: PipelineResult) -> Table:
    """The headline metrics of a pipeline run, as printed at the end of `alignpipe run`."""
    from alignpipe.app.pipeline.report import headline_metrics

    table = Table(title=f"results of {result.name} (percent)", title_justify="left")
    for column in ("eval", "run", "split", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for ev in result.evals:
        for metric, value in headline_metrics(ev["metrics"]).items():
            table.add_row(f"{ev['index']}:{ev['kind']}", ev["run"] or "identity", ev["split"],
                          metric, f"{value:.2f}")
    return table


def bench_table(rows: list[dict]) -> Table:
    """Benchmark rows ({bench, name, value, unit}) as one table."""
    table = Table(title="alignpipe bench", title_justify="left")
    for column in ("bench", "measure", "value", "unit"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for row in rows:
        value = row["value"]
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        table.add_row(row.get("bench", ""), row["name"], shown, row.get("unit", ""))
    return table


# ---- stage-two tables ---------------------------------------------------------------------------
def methods_table() -> Table:
    """`alignpipe fit --list-methods`."""
    from alignpipe.fit import default_config
    from alignpipe.methods import list_methods, method_spec

    table = Table(title="alignment methods", title_justify="left")
    for column in ("method", "trained", "what it does", "method keys (defaults)"):
        table.add_column(column)
    for name in list_methods():
        spec = method_spec(name)
        keys = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()
                         if not k.startswith("temperature") and k != "learn_temperature")
        table.add_row(name, "yes" if spec.trained else "no", spec.description, keys)
    loop = ", ".join(f"{k}={v}" for k, v in default_config("mlp").items()
                     if k not in method_spec("mlp").defaults)
    table.caption = f"loop keys of trained methods: {loop}"
    return table


def fit_summary_table(summary: dict) -> Table:
    table = Table(title=f"fit {summary['method']} → {summary['run_dir']}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    val = summary.get("best_val") or {}
    recalls = "  ".join(f"{d}: " + " ".join(f"{k} {v:.1f}" for k, v in r.items())
                        for d, r in val.items() if isinstance(r, dict))
    dropped = summary.get("dropped_rows") or {}
    rows = [("pairs", f"{summary['train_pairs']:,} train, {summary['val_pairs']:,} val"),
            ("dropped (invalid)", f"{dropped.get('train', 0)} train, {dropped.get('val', 0)} val "
                                  f"rows (invalid in a: {dropped.get('invalid_in_a', 0)}, in b: "
                                  f"{dropped.get('invalid_in_b', 0)})"),
            ("best epoch", f"{summary['best_epoch']} of {summary['epochs']}"),
            ("val recall (%)", recalls or "–"),
            ("val mean recall", f"{val.get('mean_recall', float('nan')):.2f}"),
            ("batch / steps", f"{summary['batch_size']} / {summary['steps']}"),
            ("throughput", f"{summary['pairs_per_s']:,.0f} pairs/s on {summary['device']}"),
            ("wall time", f"{summary['wall_s']:.1f} s")]
    for key, value in rows:
        table.add_row(key, value)
    return table


def retrieval_table(result: dict) -> Table:
    title = f"retrieval, {result['split']} ({result['pairs']} pairs; percent)"
    table = Table(title=title, title_justify="left")
    for column in ("direction", "R@1", "R@5", "R@10"):
        table.add_column(column, justify="left" if column == "direction" else "right")
    for key, value in result.items():
        if "_to_" in key and isinstance(value, dict):
            table.add_row(key.replace("_", " "), *(f"{v:.2f}" for v in value.values()))
    return table


def zeroshot_table(result: dict) -> Table:
    title = (f"zero-shot, {result['split']}: {result['queries']} queries, {result['classes']} "
             f"classes, class embedding {result['class_embedding']} (percent)")
    table = Table(title=title, title_justify="left")
    for column in ("top1", "top5", "mean per-class top1"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['top1']:.2f}", f"{result['top5']:.2f}",
                  f"{result.get('mean_per_class_top1', float('nan')):.2f}")
    return table


def similarity_tables(result: dict) -> list[Table]:
    tables = []
    for key, title in (("linear_cka", "linear CKA"),
                       ("mutual_knn", f"mutual kNN (k={result['k']})")):
        table = Table(title=f"{title} on {result['sample']} rows", title_justify="left")
        table.add_column("")
        for name in result["names"]:
            table.add_column(name, justify="right")
        for name, row in zip(result["names"], result[key], strict=True):
            table.add_row(name, *(f"{v:.3f}" for v in row))
        tables.append(table)
    return tables
