"""`alignpipe curate` (and `alignpipe bench curate`): choose pool rows for a target concept set.

The core (`alignpipe.curate`) computes the selection; this module parses the command, draws the
progress bar, writes the selection and its report beside it::

    SELECTION.parquet            row, id, concept, score, rule (+ pool sha256 and spec)
    SELECTION.md                 summary, rows per concept, coverage gaps, example captions
    SELECTION-per-concept.png    rows kept per concept, sorted
    SELECTION-scores.png         best-concept score of kept rows vs all pool rows

Per-shard partial results live in ``.SELECTION.parquet.parts/`` while the job runs (a rerun of
the same command skips finished shards) and are removed once the selection is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from alignpipe.app.clikit import ThreadsOption, console, err_console, friendly, use_threads
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from rich.table import Table

    from alignpipe.curate import Curation
    from alignpipe.data.manifest import Manifest

EXAMPLES = 3  # captions shown per concept in the report


def parts_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def report_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {"md": stem.with_suffix(".md"), "per_concept": Path(f"{stem}-per-concept.png"),
            "scores": Path(f"{stem}-scores.png")}


def coverage_gaps(names: list[str], counts: np.ndarray, min_rows: int) -> list[tuple[str, int]]:
    return [(n, int(c)) for n, c in zip(names, counts, strict=True) if c < min_rows]


def _examples(curation: Curation, manifest: Manifest, per: int = EXAMPLES) -> dict[str, list[str]]:
    sel = curation.selection
    column = "text" if manifest.has("text") else None
    if column is None:
        return {}
    from alignpipe.curate import column_at

    texts = column_at(manifest, column, sel.rows)
    out: dict[str, list[tuple[float, str]]] = {}
    for text, concept, score in zip(texts, sel.concepts, sel.scores.tolist(), strict=True):
        out.setdefault(concept, []).append((score, text))
    return {c: [t for _, t in sorted(v, key=lambda x: -x[0])[:per]] for c, v in out.items()}


def plot_per_concept(path: Path, names: list[str], counts: np.ndarray, cap: int) -> None:
    from alignpipe.app.render import _figure, _save_png

    order = np.argsort(-counts, kind="stable")
    plt, fig, ax = _figure(figsize=(max(6, min(24, 0.25 * len(names))), 4))
    ax.bar(range(len(names)), counts[order], color="tab:blue")
    ax.axhline(cap, color="gray", linestyle="--", linewidth=1, label=f"per-concept N = {cap}")
    if len(names) <= 60:
        ax.set_xticks(range(len(names)), [names[i] for i in order], rotation=90, fontsize=7)
    ax.set_ylabel("rows kept")
    ax.set_title(f"rows kept per concept ({len(names)} concepts, sorted)")
    ax.legend()
    _save_png(fig, plt, path)


def plot_scores(path: Path, kept: np.ndarray, pool: np.ndarray) -> None:
    from alignpipe.app.render import _figure, _save_png

    plt, fig, ax = _figure(figsize=(6, 4))
    bins = np.linspace(min(kept.min(initial=0), pool.min(initial=0)), 1.0, 60)
    ax.hist(pool, bins=bins, alpha=0.5, density=True, label=f"all pool rows (sample {pool.size})")
    ax.hist(kept, bins=bins, alpha=0.5, density=True, label=f"kept ({kept.size})")
    ax.set_xlabel("cosine to the best concept")
    ax.set_ylabel("density")
    ax.legend()
    _save_png(fig, plt, path)


def write_report(curation: Curation, out: Path, manifest: Manifest,
                 min_rows: int) -> dict[str, Path]:
    """The markdown summary and both PNGs beside the selection."""
    from alignpipe.app.render import markdown_table
    from alignpipe.util.fsutil import atomic_write_text

    paths = report_paths(out)
    sel, names = curation.selection, curation.concepts.names
    spec = sel.meta["spec"]
    counts = curation.per_concept
    gaps = coverage_gaps(names, counts, min_rows)
    examples = _examples(curation, manifest)
    lines = [f"# curation: {out.name}", "",
             f"Pool {spec['pool']} ({manifest.rows} rows, manifest sha256 "
             f"{manifest.sha256[:12]}…), {len(names)} concepts from "
             f"{', '.join(spec['concepts'])}; rule `{sel.rules[0]}`.", "",
             markdown_table(["", "value"], [
                 ["rows selected", len(sel)], ["concepts", len(names)],
                 ["per-concept N", spec["per_concept"]],
                 ["rows in several concepts' top-N (kept once)",
                  curation.removed.get("union_overlap", 0)],
                 ["dropped by balance", curation.removed.get("balance", "-")],
                 ["dropped as near-duplicates", curation.removed.get("near_duplicates", "-")],
                 ["median score kept", float(np.median(sel.scores))],
                 ["median best score, all pool rows",
                  float(np.median(curation.pool_scores)) if curation.pool_scores.size else "-"],
                 [f"concepts with fewer than {min_rows} rows", len(gaps)]]), "",
             f"![rows per concept]({paths['per_concept'].name})",
             f"![scores]({paths['scores'].name})", "",
             f"## Coverage gaps (fewer than {min_rows} rows)", ""]
    lines += ([", ".join(f"{n} ({c})" for n, c in gaps)] if gaps else ["none"])
    lines += ["", "## Rows and examples per concept", ""]
    rows = []
    for i in np.argsort(-counts, kind="stable"):
        shown = " · ".join(t.replace("|", "/") for t in examples.get(names[i], []))
        rows.append([names[i], int(counts[i]), shown])
    lines.append(markdown_table(["concept", "rows", "top captions"], rows))
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    plot_per_concept(paths["per_concept"], names, counts, spec["per_concept"])
    plot_scores(paths["scores"], sel.scores, curation.pool_scores)
    return paths


def summary_table(curation: Curation, out: Path, min_rows: int) -> Table:
    from rich.table import Table

    sel, names = curation.selection, curation.concepts.names
    counts = curation.per_concept
    table = Table(title=f"curate → {out}", show_header=False, title_justify="left")
    table.add_row("rows selected", f"{len(sel):,}")
    table.add_row("concepts", str(len(names)))
    table.add_row("rows per concept", f"min {counts.min()}, median {int(np.median(counts))}, "
                                      f"max {counts.max()}")
    for key, value in curation.removed.items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    gaps = coverage_gaps(names, counts, min_rows)
    table.add_row(f"coverage gaps (< {min_rows} rows)",
                  ", ".join(n for n, _ in gaps[:10]) + (f" (and {len(gaps) - 10} more)"
                                                         if len(gaps) > 10 else "") or "none")
    if curation.shards_skipped:
        table.add_row("shards resumed", str(curation.shards_skipped))
    return table


def run_curate(pool: Path, concepts: list[Path], out: Path, *, per_concept: int,
               threshold: float | None = None, balance: int | None = None,
               dedupe_store: Path | None = None, dedupe_threshold: float = 0.95,
               device: str | None = None, cluster: str | None = None,
               scheduler: str | None = None, min_rows: int | None = None,
               progress: bool = True) -> Curation:
    """Curate, write the selection and its report; what `alignpipe curate` and the pipeline's
    `curate:` step run. Returns the `Curation`."""
    from alignpipe.curate import curate, write_selection
    from alignpipe.data.pairing import store_manifest
    from alignpipe.util.progress import progress_bar

    out = Path(out)
    if out.suffix != ".parquet":
        raise AlignpipeError(f"--out {out}: a selection is a .parquet file")
    if out.is_dir():
        raise AlignpipeError(f"--out {out} is a folder; give a SELECTION.parquet path")
    bar = progress_bar(speed_unit="shards", console=err_console) if progress else None
    task = None

    def on_start(shards: int, skipped: int) -> None:
        nonlocal task
        if bar is not None:
            bar.start()
            task = bar.add_task("curate", total=shards)
            bar.update(task, completed=0)

    def on_shard(rows: int) -> None:
        if bar is not None and task is not None:
            bar.advance(task)

    try:
        curation = curate(pool, concepts, per_concept=per_concept, threshold=threshold,
                          balance_cap=balance, dedupe_store=dedupe_store,
                          dedupe_threshold=dedupe_threshold, device=device,
                          parts=parts_folder(out), cluster=cluster, scheduler=scheduler,
                          on_start=on_start, on_shard=on_shard)
    finally:
        if bar is not None:
            bar.stop()
    try:
        write_selection(curation.selection, out)
    finally:  # written, or empty (nothing to resume): the shard results are done with
        if out.is_file() or len(curation.selection) == 0:
            shutil.rmtree(parts_folder(out), ignore_errors=True)
    from alignpipe.data.store import open_store

    manifest = store_manifest(open_store(pool))
    write_report(curation, out, manifest, min_rows if min_rows is not None
                 else max(1, per_concept // 10))
    return curation


def curate_command(
    pool: Annotated[Path, typer.Option(help="Store of the pool manifest to choose rows from.")],
    concepts: Annotated[list[Path], typer.Option(
        help="Concept store (a manifest with class_id or label, embedded with the pool's "
             "encoder); repeatable.")],
    out: Annotated[Path, typer.Option(help="The selection to write: SELECTION.parquet.")],
    per_concept: Annotated[int, typer.Option(
        help="Top rows kept per concept (freeze-align: 50000).")] = 50_000,
    threshold: Annotated[float | None, typer.Option(
        help="Keep only rows at least this cosine to the concept.")] = None,
    balance: Annotated[int | None, typer.Option(
        help="After the union, at most this many rows per concept (its best).")] = None,
    dedupe_store: Annotated[Path | None, typer.Option(
        help="Another store of the pool (image latents) for near-duplicate removal.")] = None,
    dedupe_threshold: Annotated[float, typer.Option(
        help="Cosine above which two rows are near-duplicates (one is kept).")] = 0.95,
    min_rows: Annotated[int | None, typer.Option(
        help="Concepts with fewer rows are listed as coverage gaps (default N/10).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: best).")] = None,
    cluster: Annotated[str | None, typer.Option(
        help="Run the shards on a local dask cluster: local:N.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Run the shards on a running dask scheduler: tcp://HOST:PORT.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: ThreadsOption = None,
) -> None:
    """Select pool rows near a target concept set (top-N per concept, union, dedupe)."""
    use_threads(threads)
    curation = run_curate(pool, concepts, out, per_concept=per_concept, threshold=threshold,
                          balance=balance, dedupe_store=dedupe_store,
                          dedupe_threshold=dedupe_threshold, device=device, cluster=cluster,
                          scheduler=scheduler, min_rows=min_rows, progress=progress)
    console.print(summary_table(curation, out, min_rows if min_rows is not None
                                else max(1, per_concept // 10)))
    err_console.print(f"wrote {out} and {report_paths(out)['md']}", markup=False,
                      highlight=False, soft_wrap=True)


def bench_curate_command(
    rows: Annotated[int, typer.Option(help="Pool rows.")] = 200_000,
    concepts: Annotated[int, typer.Option(help="Concepts.")] = 1000,
    dim: Annotated[int, typer.Option(help="Latent dim.")] = 256,
    per_concept: Annotated[int, typer.Option(help="Top rows per concept.")] = 100,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: best).")] = None,
    quick: Annotated[bool, typer.Option(help="A small pool (40k rows × 200 concepts).")
                     ] = False,
    threads: ThreadsOption = None,
) -> None:
    """Curation rows/s and peak memory against a brute-force numpy reference, in one run."""
    from alignpipe.app.benchmarks.curate import run_curate_bench
    from alignpipe.app.report import bench_table

    use_threads(threads)
    console.print(bench_table([{"bench": "curate", **row} for row in run_curate_bench(
        rows=rows, concepts=concepts, dim=dim, per_concept=per_concept, device=device,
        quick=quick)]))


def register(app: typer.Typer) -> None:
    app.command("curate")(friendly(curate_command))
    bench = next(g.typer_instance for g in app.registered_groups if g.name == "bench")
    bench.command("curate")(friendly(bench_curate_command))
