"""The `alignpipe` command line: parsing only. Each verb calls one library function.

Every `AlignpipeError` becomes a one-line message on stderr and a non-zero exit, never a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from alignpipe.errors import AlignpipeError

app = typer.Typer(
    name="alignpipe",
    help="Embed once with frozen encoders into a Zarr cache; align and evaluate in minutes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
manifest_app = typer.Typer(help="Make manifests: the toy dataset and public dataset layouts.",
                           no_args_is_help=True)
eval_app = typer.Typer(help="Score a run (or two stores in one space): retrieval, zero-shot.",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print ratios measured in one run.",
                        no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)


def friendly(fn):
    """Turn user mistakes (AlignpipeError) into a clear message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignpipeError as err:
            err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False,
                              soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; finished work units are kept, rerun to resume")
            raise typer.Exit(code=130) from None

    return wrapper


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise AlignpipeError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# ---- info ---------------------------------------------------------------------------------------
@app.command()
@friendly
def info(
    store: Annotated[Path, typer.Argument(help="A latent store folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a store's rows, dim, dtype, valid count, provenance, size and finished units."""
    from alignpipe.store import open_store

    details = open_store(store).info()
    if as_json:
        console.print_json(json.dumps(details))
        return
    from alignpipe.report import store_info_table

    console.print(store_info_table(details))


# ---- import -------------------------------------------------------------------------------------
@app.command("import")
@friendly
def import_(
    latents: Annotated[Path, typer.Argument(help="A .npy file (rows in manifest order) or a "
                                                 "clip-retrieval output folder.")],
    manifest: Annotated[Path, typer.Option(help="The manifest the rows belong to.")],
    modality: Annotated[str, typer.Option(help="image, text or audio.")],
    encoder: Annotated[str, typer.Option(help="Name to file the store under and record.")],
    cache: Annotated[Path, typer.Option(help="Cache root.")] = Path("cache"),
    dataset: Annotated[str | None, typer.Option(
        help="Dataset name (default: manifest stem).")] = None,
    key: Annotated[str | None, typer.Option(
        help="clip-retrieval only: METADATA_COLUMN[=MANIFEST_COLUMN] that matches rows "
             "(default image_path=image or caption=text).")] = None,
    allow_unmatched: Annotated[bool, typer.Option(
        help="clip-retrieval only: mark manifest rows with no embedding invalid instead of "
             "refusing.")] = False,
    dtype: Annotated[str, typer.Option(help="float16 or float32.")] = "float16",
    unit_rows: Annotated[int, typer.Option(help="Rows per work unit (= shard).")] = 8192,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
) -> None:
    """Turn embeddings computed elsewhere into a store (no media files are opened)."""
    from alignpipe.importer import import_latents

    result = import_latents(latents, manifest=manifest, modality=modality, encoder=encoder,
                            cache=cache, dataset=dataset, key=key,
                            allow_unmatched=allow_unmatched, dtype=dtype, unit_rows=unit_rows,
                            overwrite=overwrite)
    console.print(f"imported {result['rows']} rows ({result['valid']} valid) × {result['dim']} "
                  f"into {result['path']}")


# ---- manifest -----------------------------------------------------------------------------------
@manifest_app.command("toy")
@friendly
def manifest_toy(
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    rows: Annotated[int, typer.Option(help="Rows (captions) to make.")] = 600,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")] = 0,
    captions_per_item: Annotated[int, typer.Option(help="Rows sharing one image and clip.")] = 2,
) -> None:
    """Generate the deterministic toy image–text–audio dataset."""
    from alignpipe.toy import make_toy

    if rows < 1 or captions_per_item < 1:
        raise AlignpipeError("--rows and --captions-per-item must be at least 1")
    paths = make_toy(out, rows=rows, seed=seed, captions_per_item=captions_per_item,
                     progress=rows > 5000)
    console.print(f"wrote {paths['manifest']} ({rows} rows) and {paths['prompts']}")


# ---- embed (stage one) --------------------------------------------------------------------------
# SECTION embed: owned by the stage-one work.
@app.command()
@friendly
def embed() -> None:
    """Stream a manifest once through a frozen encoder into the latent store."""
    raise AlignpipeError("embed is not built yet")
# END SECTION embed


# ---- fit / eval / similarity (stage two) --------------------------------------------------------
# SECTION stage-two: owned by the stage-two work.
@app.command()
@friendly
def fit() -> None:
    """Train alignment heads on two stores of one manifest."""
    raise AlignpipeError("fit is not built yet")


@app.command()
@friendly
def similarity() -> None:
    """Linear CKA and mutual kNN between stores of one manifest."""
    raise AlignpipeError("similarity is not built yet")


@eval_app.command("retrieval")
@friendly
def eval_retrieval() -> None:
    """Recall@K both ways between two stores through a run's heads."""
    raise AlignpipeError("eval retrieval is not built yet")


@eval_app.command("zeroshot")
@friendly
def eval_zeroshot() -> None:
    """Zero-shot classification of a query store against a prompts store."""
    raise AlignpipeError("eval zeroshot is not built yet")
# END SECTION stage-two


# ---- run / bench (pipelines) --------------------------------------------------------------------
# SECTION pipelines: owned by the pipeline work.
@app.command()
@friendly
def run(
    pipeline: Annotated[Path, typer.Argument(help="A pipeline YAML, e.g. pipelines/toy.yaml.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key of the file: fit.image-text.method=mlp (repeatable)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Print the plan, marking what the cache already holds; run nothing.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run a pipeline YAML: embed, fit and eval, reusing whatever the cache holds."""
    from alignpipe.pipeline import run_pipeline
    from alignpipe.report import results_table

    result = run_pipeline(pipeline, parse_overrides(set_), dry_run=dry_run, progress=progress,
                          echo=lambda line: console.print(line, markup=False, highlight=False))
    if dry_run:
        return
    if result.evals:
        console.print(results_table(result))
    console.print(f"report: {result.report}")


@bench_app.command("all")
@friendly
def bench_all(
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: best).")] = None,
    quick: Annotated[bool, typer.Option(help="Smaller inputs, for a smoke run.")] = False,
) -> None:
    """Every benchmark, one table of ratios measured in one run."""
    from alignpipe.benchmarks import run_all
    from alignpipe.report import bench_table

    console.print(bench_table(run_all(device=device, quick=quick)))
# END SECTION pipelines


# SECTION manifest-builders: owned by the dataset-builder work.
# END SECTION manifest-builders


def main() -> None:
    app(prog_name="alignpipe")


if __name__ == "__main__":
    sys.exit(main())
