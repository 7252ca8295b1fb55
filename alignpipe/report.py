"""Human-readable output: rich tables for the terminal, markdown for files."""

from __future__ import annotations

from rich.table import Table


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


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats to two decimals."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(result) -> Table:
    """The headline metrics of a pipeline run, as printed at the end of `alignpipe run`."""
    from alignpipe.pipeline_report import flatten_metrics

    table = Table(title=f"results of {result.name} (percent)", title_justify="left")
    for column in ("eval", "run", "split", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for ev in result.evals:
        for metric, value in flatten_metrics(ev["metrics"]).items():
            if metric in ("top1", "top5") or "R@" in metric:
                table.add_row(f"{ev['index']}:{ev['kind']}", ev["run"] or "identity",
                              ev["split"], metric, f"{value:.2f}")
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
