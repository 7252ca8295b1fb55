"""The `alignpipe` command line: parsing only. Each verb calls one library function.

Every `AlignpipeError` becomes a one-line message on stderr and a non-zero exit, never a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from alignpipe.app.clikit import (
    ThreadsOption,
    console,
    err_console,
    friendly,
    parse_overrides,
    use_threads,
)
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    import click

    from alignpipe.data.builders.registry import BuilderSpec
    from alignpipe.evaluate.registry import EvaluatorSpec


class _PluginGroup(TyperGroup):
    """A command group with one command per registered plug-in, made from its declaration when
    first asked for (so a plug-in registered after this module was imported is a command too).
    Subclasses name the plug-ins: `kind -> (help, command function)`, built lazily."""

    def plugins(self) -> dict:
        raise NotImplementedError

    def _add_plugins(self) -> None:
        for kind, make in self.plugins().items():
            if kind not in self.commands:
                help_text, command = make()
                single = typer.Typer(add_completion=False)
                single.command(kind, help=help_text)(command)
                self.add_command(typer.main.get_command(single), kind)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._add_plugins()
        return super().get_command(ctx, cmd_name)


class _BuilderGroup(_PluginGroup):
    """`alignpipe manifest`: one command per registered builder, from its declared options
    (alignpipe/data/builders/registry.py, _builder_command below)."""

    def plugins(self) -> dict:
        from alignpipe.data.builders import builder_spec, list_builders

        specs = {kind: builder_spec(kind) for kind in list_builders()}
        return {kind: functools.partial(lambda s: (s.help, _builder_command(s)), spec)
                for kind, spec in specs.items() if spec.cli}


class _EvalGroup(_PluginGroup):
    """`alignpipe eval`: the hand-written retrieval and zeroshot commands, plus one command per
    other registered evaluator, from its declaration (_eval_command below)."""

    def plugins(self) -> dict:
        from alignpipe.evaluate import evaluator_spec, list_evaluators

        return {kind: functools.partial(
                    lambda k: (evaluator_spec(k).description, _eval_command(evaluator_spec(k))),
                    kind)
                for kind in list_evaluators()}


app = typer.Typer(
    name="alignpipe",
    help="Embed once with frozen encoders into a Zarr cache; align and evaluate in minutes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
manifest_app = typer.Typer(help="Make manifests: the toy dataset and public dataset layouts.",
                           no_args_is_help=True, cls=_BuilderGroup)
eval_app = typer.Typer(help="Score a run (or two stores in one space): retrieval, zero-shot.",
                       no_args_is_help=True, cls=_EvalGroup)
bench_app = typer.Typer(help="Benchmarks that print ratios measured in one run.",
                        no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

# ---- info ---------------------------------------------------------------------------------------
@app.command()
@friendly
def info(
    store: Annotated[Path, typer.Argument(help="A latent store folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also check every finished unit's files against their sha256 (reads "
                         "the whole store); without it only existence and sizes.")] = False,
) -> None:
    """Show a store's rows, dim, dtype, valid count, provenance, size and finished units.

    Exits with an error naming the damaged work units, and the command that redoes them, when
    any finished unit's files are missing or changed.
    """
    from alignpipe.data.store import open_store
    from alignpipe.util.errors import StoreError

    opened = open_store(store)
    details = opened.info()
    damaged = opened.damaged_units(checksums=True) if verify else {
        int(u): reason for u, reason in details["damaged_units"].items()}
    details["damaged_units"] = {str(u): reason for u, reason in damaged.items()}
    if as_json:
        console.print_json(json.dumps(details))
    else:
        from alignpipe.app.report import store_info_table

        console.print(store_info_table(details))
    if damaged:
        raise StoreError(opened.damage_message(damaged))
    if verify:
        console.print(f"verified: {len(opened.done_units())} finished units match their "
                      f"checksums")


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
    from alignpipe.data.importer import import_latents

    result = import_latents(latents, manifest=manifest, modality=modality, encoder=encoder,
                            cache=cache, dataset=dataset, key=key,
                            allow_unmatched=allow_unmatched, dtype=dtype, unit_rows=unit_rows,
                            overwrite=overwrite)
    console.print(f"imported {result['rows']} rows ({result['valid']} valid) × {result['dim']} "
                  f"into {result['path']}")


# ---- embed (stage one) --------------------------------------------------------------------------
@app.command()
@friendly
def embed(
    manifest: Annotated[Path | None, typer.Argument(help="The manifest to embed.")] = None,
    encoder: Annotated[str | None, typer.Option(
        help="Encoder name (see --list-encoders), timm:<model> or hf:<hub id>.")] = None,
    cache: Annotated[Path, typer.Option(help="Cache root.")] = Path("cache"),
    dataset: Annotated[str | None, typer.Option(
        help="Dataset folder name under the cache (default: manifest stem).")] = None,
    column: Annotated[str | None, typer.Option(
        help="Manifest column to read (default: the encoder's modality); a media column "
             "must be of the encoder's modality.")] = None,
    weights: Annotated[str | None, typer.Option(
        help="Local weights file or folder instead of the hub; 'random' for seeded random "
             "weights (timing).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input resolution override.")] = None,
    pooling: Annotated[str | None, typer.Option(
        help="cls, mean, cls+mean (vision); mean, cls, max (text).")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="Compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, "
             "float16.")] = None,
    latent_dtype: Annotated[str, typer.Option(help="Stored dtype: float16 or float32.")
                            ] = "float16",
    batch_size: Annotated[int | None, typer.Option(
        help="Items per forward pass (a resumed store keeps the one it started with).")
                          ] = None,
    workers: Annotated[int | None, typer.Option(
        help="Decode worker processes (default: CPU count, shared out under --cluster).")
                       ] = None,
    unit_rows: Annotated[int, typer.Option(help="Rows per work unit (= Zarr shard).")] = 8192,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: best).")
                      ] = None,
    cluster: Annotated[str | None, typer.Option(
        help="local:N runs work units on N dask workers on this machine.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="tcp://HOST:PORT of a running dask scheduler to run work units on.")] = None,
    max_failure_rate: Annotated[float, typer.Option(
        help="Exit non-zero when more than this fraction of rows fail.")] = 0.01,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a store made with another encoder spec or manifest.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also check finished units' files against their sha256 (reads the "
        "whole store) and redo the damaged ones.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    list_encoders_: Annotated[bool, typer.Option(
        "--list-encoders", help="List the registered encoders with their pooling and "
        "preprocessing (no weights are loaded) and exit.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Stream a manifest once through a frozen encoder into the latent store (resumable)."""
    if list_encoders_:
        from rich.table import Table

        from alignpipe.encoders import list_encoders

        table = Table(box=None)
        for name in ("name", "modality", "source", "dim", "pooling"):
            table.add_column(name, overflow="fold")
        steps = Table(box=None)  # specs only: no weights and no model config are loaded
        for name in ("name", "preprocessing"):
            steps.add_column(name, overflow="fold", no_wrap=name == "name")
        for spec in list_encoders():
            table.add_row(spec.name, spec.modality, spec.source, str(spec.dim), spec.pooling)
            steps.add_row(spec.name, spec.describe_preprocessing())
        console.print(table)
        console.print(steps)
        return
    if manifest is None or encoder is None:
        raise AlignpipeError("embed needs a MANIFEST and --encoder NAME "
                             "(--list-encoders shows the names)")
    use_threads(threads)
    from alignpipe.embed import FailureRateError
    from alignpipe.embed import embed as run_embed

    try:
        summary = run_embed(
            manifest, encoder, cache, dataset=dataset, column=column, weights=weights,
            image_size=image_size, pooling=pooling, dtype=dtype, latent_dtype=latent_dtype,
            batch_size=batch_size, workers=workers, unit_rows=unit_rows, device=device,
            cluster=cluster, scheduler=scheduler, max_failure_rate=max_failure_rate,
            overwrite=overwrite, progress=progress, verify=verify)
    except FailureRateError as err:
        console.print(err.summary.line(), markup=False, highlight=False, soft_wrap=True)
        raise
    console.print(summary.line(), markup=False, highlight=False, soft_wrap=True)


@bench_app.command("embed")
@friendly
def bench_embed(
    encoder: Annotated[str, typer.Option(help="Encoder to time.")] = "test-vit",
    rows: Annotated[int, typer.Option(help="Toy JPEG rows to generate and embed.")] = 2000,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: best).")
                      ] = None,
    weights: Annotated[str | None, typer.Option(
        help="Weights for the encoder; 'random' times a random-init model (e.g. dinov2 "
             "without the hub).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input resolution override.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Items per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode worker processes.")] = None,
    repeats: Annotated[int, typer.Option(
        help="Run each measure this many times and keep its best (noisy machines).")] = 1,
    quick: Annotated[bool, typer.Option(help="Fewer rows, for a smoke run.")] = False,
) -> None:
    """embed vs the bare forward loop vs a naive decode→forward loop, on the same inputs."""
    from alignpipe.app.benchmarks.embed import run_embed_bench
    from alignpipe.app.report import bench_table

    console.print(bench_table(run_embed_bench(
        encoder=encoder, rows=rows, device=device, weights=weights, image_size=image_size,
        batch_size=batch_size, workers=workers, quick=quick, repeats=repeats)))


# ---- fit / eval / similarity (stage two) --------------------------------------------------------
def _store_pair(item: str) -> tuple[Path, Path]:
    """``STORE_A,STORE_B`` of `--also`, refused in one line when it is not two paths."""
    parts = [p for p in item.split(",") if p.strip()]
    if len(parts) != 2:
        raise AlignpipeError(f"--also {item!r}: give two stores as STORE_A,STORE_B")
    return Path(parts[0].strip()), Path(parts[1].strip())


def _common_overrides(set_: list[str] | None, **flags) -> dict[str, str]:
    """``--set`` pairs plus the common flags given (flags win: they are the more specific)."""
    overrides = parse_overrides(set_)
    overrides.update({key: str(value) for key, value in flags.items() if value is not None})
    return overrides


ManifestOption = Annotated[list[Path] | None, typer.Option(
    "--manifest", help="Where the stores' manifest is now, if it moved apart from them "
                       "(checked by sha256; repeat for stores of two manifests).")]
AllowPartialOption = Annotated[bool, typer.Option(
    help="Use unfinished stores anyway (only the rows embedded so far).")]


def _print_partial(result: dict) -> None:
    for note in result.get("partial", []):
        err_console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@friendly
def fit(
    store_a: Annotated[Path | None, typer.Argument(help="Store of one modality.")] = None,
    store_b: Annotated[Path | None, typer.Argument(
        help="Store of another modality, embedded from the same manifest.")] = None,
    method: Annotated[str | None, typer.Option(
        help="Method name (see --list-methods; default fusemix, or the run's on --resume).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder, e.g. runs/NAME.")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML config, e.g. pipelines/fit/fusemix.yaml.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key: dropout=0.3 (repeatable).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Pairs per step (default 20480, reduced to fit device and data).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: best).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue a killed run from its last checkpoint, with its saved stores and "
             "config (flags given must match them).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a run already in --out (its eval results there are removed too).")
    ] = False,
    list_methods: Annotated[bool, typer.Option(
        "--list-methods", help="List the registered methods and exit.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar and log lines.")] = True,
    manifest: ManifestOption = None,
    allow_partial: AllowPartialOption = False,
    select: Annotated[list[Path] | None, typer.Option(
        help="Train only on the train-split rows of this selection (from `alignpipe curate`); "
             "repeatable.")] = None,
    also: Annotated[list[str] | None, typer.Option(
        help="Train on another manifest's stores too, same encoders: STORE_A,STORE_B "
             "(repeatable; a --select of that manifest applies to them).")] = None,
    threads: ThreadsOption = None,
) -> None:
    """Train alignment heads on two stores of one manifest (nothing touches an encoder)."""
    if list_methods:
        from alignpipe.app.report import methods_table

        console.print(methods_table())
        return
    if out is None or ((store_a is None or store_b is None) and not resume):
        raise AlignpipeError("fit needs two stores and --out RUN_FOLDER (or --list-methods; "
                             "`--out RUN --resume` alone continues a run)")
    from alignpipe.app.render import CurvesPNG
    from alignpipe.app.report import fit_summary_table
    from alignpipe.fit import fit as fit_stores

    use_threads(threads)

    overrides = _common_overrides(set_, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    summary = fit_stores(store_a, store_b, method=method, out=out, config=config,
                         overrides=overrides, resume=resume, device=device, progress=progress,
                         overwrite=overwrite, manifest=manifest, allow_partial=allow_partial,
                         callbacks=[CurvesPNG()], select=select or None,
                         also=[_store_pair(item) for item in also or ()])
    console.print(fit_summary_table(summary.to_dict()))
    if summary.cached:
        err_console.print(f"{out} already holds this finished run (same method, config and "
                          f"stores); nothing was fitted (--overwrite fits it again)",
                          markup=False, highlight=False, soft_wrap=True)
    for line in summary.warnings:
        err_console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@friendly
def similarity(
    stores: Annotated[list[Path], typer.Argument(help="Two or more stores of one manifest.")],
    output: Annotated[Path, typer.Option(
        help="JSON to write (a heatmap PNG goes beside it).")] = Path("similarity.json"),
    sample: Annotated[int, typer.Option(help="Rows to sample (valid in every store).")] = 5000,
    k: Annotated[int, typer.Option(help="Neighbours for mutual kNN.")] = 10,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    manifest: ManifestOption = None,
    allow_partial: AllowPartialOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Linear CKA and mutual kNN between every pair of stores of one manifest."""
    use_threads(threads)
    from alignpipe.app.report import similarity_tables
    from alignpipe.app.results import similarity_to

    result = similarity_to(output, stores, sample=sample, k=k, seed=seed,
                           manifest=manifest, allow_partial=allow_partial)
    _print_partial(result)
    for table in similarity_tables(result):
        console.print(table)
    console.print(f"wrote {output} and {output.with_suffix('.png')}")


RunOption = Annotated[Path | None, typer.Option(help="A run folder made by alignpipe fit.")]
IdentityOption = Annotated[bool, typer.Option(
    help="Compare the stores' latents directly (they already share a space, e.g. CLIP).")]
OutputOption = Annotated[Path | None, typer.Option(
    help="Results JSON (default: eval-KIND-SPLIT[-OPTIONS]__STORE__STORE.json in the run folder, "
         "or here with --identity); .md and .png go beside it.")]
EvalSplitOption = Annotated[str, typer.Option(
    help="train, val, test, or all (every row; needed when the manifest has no split column).")]


def _print_eval_end(result: dict) -> None:
    """An eval's warnings, then where it wrote."""
    for note in result.get("warnings", []):
        err_console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
    out = Path(result["output"])
    beside = [p.suffix for p in (out.with_suffix(".md"), out.with_suffix(".png")) if p.exists()]
    console.print(f"wrote {out}" + (f" (+ {', '.join(beside)} beside it)" if beside else ""),
                  markup=False, highlight=False, soft_wrap=True)


@eval_app.command("retrieval")
@friendly
def eval_retrieval(
    store_a: Annotated[Path, typer.Argument(help="Store of one modality.")],
    store_b: Annotated[Path, typer.Argument(help="Store of the other modality.")],
    run: RunOption = None,
    identity: IdentityOption = False,
    split: EvalSplitOption = "test",
    output: OutputOption = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: best).")] = None,
    manifest: ManifestOption = None,
    allow_partial: AllowPartialOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Recall@1/5/10 both ways between two stores (through a run, or --identity)."""
    use_threads(threads)
    from alignpipe.app.report import retrieval_table
    from alignpipe.app.results import run_evaluation

    result = run_evaluation("retrieval", run, [store_a, store_b], output=output, split=split,
                      identity=identity, device=device, manifest=manifest,
                      allow_partial=allow_partial)
    _print_partial(result)
    console.print(retrieval_table(result))
    _print_eval_end(result)


@eval_app.command("zeroshot")
@friendly
def eval_zeroshot(
    query_store: Annotated[Path, typer.Argument(
        help="Store to classify (its manifest has label, and class_id if the prompts have it).")],
    prompts_store: Annotated[Path, typer.Argument(
        help="Store of the class prompts (one row per class × template, class in label, "
             "keyed by class_id when both manifests have one).")],
    run: RunOption = None,
    identity: IdentityOption = False,
    split: EvalSplitOption = "test",
    class_embedding: Annotated[str, typer.Option(
        help="mean (CLIP: average templates) or max (ASIF: best template).")] = "mean",
    output: OutputOption = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: best).")] = None,
    manifest: ManifestOption = None,
    allow_partial: AllowPartialOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Zero-shot classification of a query store against a prompts store."""
    use_threads(threads)
    from alignpipe.app.report import zeroshot_table
    from alignpipe.app.results import run_evaluation

    result = run_evaluation("zeroshot", run, [query_store, prompts_store], output=output,
                            split=split, class_embedding=class_embedding, identity=identity,
                            device=device, manifest=manifest, allow_partial=allow_partial)
    _print_partial(result)
    console.print(zeroshot_table(result))
    _print_eval_end(result)


def _eval_command(spec: EvaluatorSpec) -> Callable[..., None]:
    """The typer callback of `alignpipe eval <spec.name>` for an evaluator with no hand-written
    command: its stores as arguments, the options every eval takes, then its own options."""
    import inspect

    def param(name: str, annotation: Any,
              default: Any = inspect.Parameter.empty) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=annotation)

    device = Annotated[str | None, typer.Option(help="cpu, cuda (default: best).")]
    parameters = [param(side, Annotated[Path, typer.Argument(help=f"The {side} store.")])
                  for side in spec.stores]
    parameters += [param("run", RunOption, None), param("identity", IdentityOption, False),
                   param("split", EvalSplitOption, "test"), param("output", OutputOption, None),
                   param("device", device, None), param("manifest", ManifestOption, None),
                   param("allow_partial", AllowPartialOption, False),
                   param("threads", ThreadsOption, None)]
    for name, default in spec.options.items():
        kind = type(default) if default is not None else str | None
        parameters.append(param(name, Annotated[kind, typer.Option(
            help=f"An option of the {spec.name} evaluator.")], default))

    def command(**values) -> None:
        use_threads(values.pop("threads"))
        from alignpipe.app.results import run_evaluation

        stores = [values.pop(side) for side in spec.stores]
        result = run_evaluation(spec.name, values.pop("run"), stores, output=values.pop("output"),
                          **values)
        _print_partial(result)
        for key, value in result.items():  # the headline numbers
            if isinstance(value, int | float) and not isinstance(value, bool):
                console.print(f"{key}: {value}", markup=False, highlight=False)
        _print_eval_end(result)

    command.__name__ = f"eval_{spec.name}"
    command.__doc__ = spec.description
    command = friendly(command)
    command.__signature__ = inspect.Signature(parameters)
    return command


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise AlignpipeError(f"{option} takes comma-separated integers, got {text!r}") from None


@bench_app.command("fit")
@friendly
def bench_fit(
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: best).")] = None,
    quick: Annotated[bool, typer.Option(help="Smaller inputs, for a smoke run.")] = False,
    method: Annotated[str, typer.Option(help="Trained method to time.")] = "fusemix",
    rows: Annotated[int | None, typer.Option(help="Training rows (default by device).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step.")] = None,
    dims: Annotated[str | None, typer.Option(help="Latent dims a,b (e.g. 1536,1024).")] = None,
    peak_tflops: Annotated[float | None, typer.Option(
        help="Peak dense TFLOP/s of the device for MFU (default: known GPUs only).")] = None,
    quality: Annotated[bool, typer.Option(
        help="Instead: methods × training sizes on the synthetic benchmark.")] = False,
    sizes: Annotated[str, typer.Option(help="--quality training sizes.")] = "500,2000,10000",
) -> None:
    """Fit throughput vs a DataLoader loop and vs pure compute; MFU and FuseMix projection."""
    from alignpipe.app.benchmarks.fit import run_fit_bench, run_quality
    from alignpipe.app.report import bench_table

    if quality:
        table = run_quality(_int_list(sizes, "--sizes"), device=device, echo=console.print)
        console.print(table, markup=False, highlight=False)
        return
    parsed = tuple(_int_list(dims, "--dims")) if dims else None
    console.print(bench_table(run_fit_bench(
        device=device, quick=quick, method=method, rows=rows, batch_size=batch_size, dims=parsed,
        peak_tflops=peak_tflops)))


# ---- run / bench (pipelines) --------------------------------------------------------------------
@app.command()
@friendly
def run(
    pipeline: Annotated[Path, typer.Argument(help="A pipeline YAML, e.g. pipelines/toy.yaml.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key of the file, the value read as YAML: "
                      "fit.image-text.method=mlp, 'fit.image-text.method=[fusemix, mlp]', "
                      "fit.f.set.identity_side=null (repeatable; unknown keys are refused)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Print the plan, marking what the cache already holds; run nothing.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: ThreadsOption = None,
) -> None:
    """Run a pipeline YAML: embed, fit and eval, reusing whatever the cache holds."""
    from alignpipe.app.pipeline.runner import run_pipeline
    from alignpipe.app.report import results_table

    use_threads(threads)

    result = run_pipeline(pipeline, parse_overrides(set_), dry_run=dry_run, progress=progress,
                          echo=lambda line: console.print(line, markup=False, highlight=False,
                                                          soft_wrap=True))
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
    from alignpipe.app.benchmarks import run_all
    from alignpipe.app.report import bench_table

    console.print(bench_table(run_all(device=device, quick=quick)))


# ---- manifest builders --------------------------------------------------------------------------
# One `alignpipe manifest <kind>` command per registered builder, made from its declared options
# (alignpipe/data/builders/registry.py): arguments in declaration order, then --options.
def _builder_command(spec: BuilderSpec) -> Callable[..., None]:
    """The typer callback of `alignpipe manifest <spec.kind>`."""
    import inspect

    parameters = []
    for option in spec.cli_options():
        declare = typer.Argument if option.positional else typer.Option
        kind = option.type if option.required or option.default is not None else (
            option.type | None)
        parameters.append(inspect.Parameter(
            option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default,
            annotation=Annotated[kind, declare(help=option.help)]))

    def command(**values) -> None:
        result = spec.run(values, progress=True)
        text = result.summary() if hasattr(result, "summary") else str(result)
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    command.__name__ = f"manifest_{spec.kind}"
    command.__doc__ = spec.help
    command = friendly(command)
    command.__signature__ = inspect.Signature(parameters)
    return command


#: Verbs written in modules of their own: each module has ``register(app)``, which adds its
#: commands (with `alignpipe.app.clikit.friendly` and its shared options). A new verb is one
#: module plus one name here.
COMMAND_MODULES: tuple[str, ...] = ("alignpipe.app.curate", "alignpipe.app.use")


def _register_command_modules() -> None:
    from importlib import import_module

    for name in COMMAND_MODULES:
        import_module(name).register(app)


_register_command_modules()


def main() -> None:
    app(prog_name="alignpipe")


if __name__ == "__main__":
    sys.exit(main())
