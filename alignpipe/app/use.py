"""Using a fitted run as a model: `alignpipe predict`, `alignpipe search`, `alignpipe export`.

Each verb is parsing plus one call into the core's `alignpipe.model` package.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import Annotated

import typer

from alignpipe.app.clikit import ThreadsOption, console, err_console, friendly, use_threads
from alignpipe.util.errors import AlignpipeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")

WeightsOption = Annotated[list[str] | None, typer.Option(
    "--weights", help="MODALITY=PATH: load that side's encoder weights from a local file or "
                      "folder (their sha256 must match the store's record); repeatable.")]
DeviceOption = Annotated[str | None, typer.Option(
    help="cpu, cuda, cuda:N or mps (default: the best there is).")]


def parse_weights(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        modality, sep, path = item.partition("=")
        if not sep or modality not in ("image", "text", "audio") or not path:
            raise AlignpipeError(f"--weights expects MODALITY=PATH (image, text or audio), got "
                                 f"{item!r}")
        out[modality] = path
    return out


def collect_inputs(inputs: list[str], modality: str) -> list[str]:
    """Files, folders (their media files, recursively, sorted) and globs -> file paths."""
    suffixes = IMAGE_SUFFIXES if modality == "image" else AUDIO_SUFFIXES
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
            if not found:
                raise AlignpipeError(f"{path}: no {modality} files ({', '.join(suffixes)}) in "
                                     f"this folder")
            out += [str(p) for p in found]
        elif any(ch in item for ch in "*?[") and not path.exists():
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise AlignpipeError(f"{item}: matches no files")
            out += matched
        else:
            out.append(item)  # a missing file is reported with the others' predictions
    return out


def parse_classes(spec: str) -> list[str]:
    """``imagenet``, a file with one class per line, or comma-separated names."""
    from alignpipe.data.builders.classes import CLASS_SETS, read_class_names

    if spec in CLASS_SETS or ("," not in spec and Path(spec).is_file()):
        return read_class_names(spec)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise AlignpipeError("--classes: give a file with one class per line, 'imagenet', or "
                             "comma-separated names")
    return names


def _prediction_rows(predictions: list) -> list[dict]:
    rows = []
    for p in predictions:
        row = {"input": p.input, "error": p.error}
        for i, (name, prob) in enumerate(zip(p.classes, p.probabilities, strict=True), 1):
            row[f"class_{i}"], row[f"prob_{i}"] = name, round(prob, 6)
        rows.append(row)
    return rows


def write_predictions(path: Path, predictions: list, k: int) -> None:
    from alignpipe.util.fsutil import atomic_write_bytes

    if path.suffix.lower() == ".json":
        data = [{"input": p.input, "error": p.error,
                 "top": [{"class": c, "probability": v}
                         for c, v in zip(p.classes, p.probabilities, strict=True)]}
                for p in predictions]
        atomic_write_bytes(path, json.dumps(data, indent=1).encode())
        return
    if path.suffix.lower() != ".csv":
        raise AlignpipeError(f"--output {path}: give a .csv or .json file")
    fields = ["input"] + [f for i in range(1, k + 1) for f in (f"class_{i}", f"prob_{i}")] + [
        "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(_prediction_rows(predictions))
    atomic_write_bytes(path, buffer.getvalue().encode())


def predict(
    run: Annotated[Path, typer.Argument(help="A run folder or an exported model folder.")],
    inputs: Annotated[list[str], typer.Argument(
        help="Image or audio files, folders (searched recursively) or globs.")],
    classes: Annotated[str, typer.Option(
        help="A file with one class name per line, 'imagenet', or comma-separated names.")],
    templates: Annotated[str, typer.Option(
        help="Prompt templates: clip80, asif7, photo, or a file (one per line, '{}' = "
             "class).")] = "photo",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes per input.")] = 3,
    output: Annotated[Path | None, typer.Option(
        help="Write the predictions as .csv or .json.")] = None,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Zero-shot classification of image or audio files by class names."""
    from rich.table import Table

    from alignpipe.model import load_model

    use_threads(threads)
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise AlignpipeError(f"--output {output}: give a .csv or .json file")
    model = load_model(run, device=device, weights=parse_weights(weights))
    modality = next((m for m in model.modalities if m != "text"), None)
    if modality is None or "text" not in model.modalities:
        raise AlignpipeError(f"{run}: predict needs an image–text or audio–text model; this one "
                             f"reads {' and '.join(model.modalities)}")
    names = parse_classes(classes)
    files = collect_inputs(inputs, modality)
    model.zero_shot(names, templates)
    predictions = model.classify(files, k=top_k, modality=modality)
    table = Table(title=f"{model.name}: zero-shot over {len(names)} classes")
    table.add_column("input", overflow="fold")
    for i in range(1, min(top_k, len(names)) + 1):
        table.add_column(f"#{i}")
    for p in predictions:
        if p.error is None:
            cells = [f"{c} ({v:.0%})" for c, v in zip(p.classes, p.probabilities, strict=True)]
            table.add_row(p.input, *cells)
    console.print(table)
    failed = [p for p in predictions if p.error is not None]
    for p in failed:
        where = "" if p.input in p.error else f"{p.input}: "
        err_console.print(f"[bold red]error:[/] {where}{p.error}", highlight=False)
    if output is not None:
        write_predictions(output, predictions, top_k)
        console.print(f"wrote {output}")
    if failed and len(failed) == len(predictions):
        raise AlignpipeError(f"none of the {len(predictions)} inputs could be decoded")


def _gallery(path: Path, run: Path, store: Path, query_label: str, query_modality: str,
             query_value: str, hits: list, modality: str) -> Path:
    from alignpipe.app.gallery import GalleryGroup, GalleryItem, write_gallery

    query = GalleryItem(id="query", modality=query_modality,
                        media=str(Path(query_value).resolve()) if query_modality != "text"
                        else None,
                        text=query_value if query_modality == "text" else Path(query_value).name)
    results = [GalleryItem(id=h.id, modality=modality, media=h.media,
                           text=h.text if modality == "text" else (h.label or h.text),
                           score=h.score) for h in hits]
    return write_gallery(path, f"search: {run.name}",
                         [GalleryGroup(title=query_label, query=query, results=results)],
                         intro=f"top {len(hits)} rows of {store} for this query")


def search(
    run: Annotated[Path, typer.Argument(help="A run folder or an exported model folder.")],
    store: Annotated[Path, typer.Option(help="The latent store to search.")],
    query: Annotated[str | None, typer.Option(help="A text query.")] = None,
    query_file: Annotated[Path | None, typer.Option(
        help="An image or audio file as the query (image→text, audio→text).")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Results to return.")] = 10,
    output: Annotated[Path | None, typer.Option(help="Write the results as .json.")] = None,
    html: Annotated[Path | None, typer.Option(
        help="Write a self-contained HTML page of the results.")] = None,
    index: Annotated[bool, typer.Option(
        "--index", help="Search an approximate index (usearch HNSW; pip install "
                        "'alignpipe[index]'), built on first use and kept beside the store "
                        "until the store or the run changes.")] = False,
    auto_index: Annotated[bool, typer.Option(
        "--auto-index", help="Use the approximate index above 1,000,000 store rows (when "
                             "usearch is installed), exact search below.")] = False,
    weights: WeightsOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """The top-k rows of a cached store for a text, image or audio query (exact search, or an
    approximate index with --index)."""
    from rich.markup import escape
    from rich.table import Table

    from alignpipe.data.pairing import as_store
    from alignpipe.model import load_model
    from alignpipe.model.index import IndexUnavailable
    from alignpipe.model.search import search_store

    use_threads(threads)
    if (query is None) == (query_file is None):
        raise AlignpipeError("give --query TEXT or --query-file FILE (one of them)")
    if output is not None and output.suffix.lower() != ".json":
        raise AlignpipeError(f"--output {output}: give a .json file")
    if index and auto_index:
        raise AlignpipeError("give --index or --auto-index, not both")
    model = load_model(run, device=device, weights=parse_weights(weights))
    opened = as_store(store)
    if query is not None:
        query_modality, value = "text", query
    else:
        others = [m for m in model.modalities if m != opened.modality] or model.modalities
        query_modality, value = others[0], str(query_file)
        if query_modality == "text":
            raise AlignpipeError(f"--query-file is an image or audio file; the query side of "
                                 f"{opened.path} is text: use --query")
    try:
        hits = search_store(model, opened, [value], query_modality=query_modality, k=k,
                            index="auto" if auto_index else index, progress=True)[0]
    except IndexUnavailable as err:  # printed as plain text: friendly's markup eats "[index]"
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(code=err.exit_code) from None
    label = value if query_modality == "text" else f"{query_modality} {value}"
    table = Table(title=f"{model.name}: top {len(hits)} of {opened.path} for {label!r}")
    for column in ("rank", "score", "id", "media", "text"):
        table.add_column(column, overflow="fold")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.3f}", h.id, h.media or "", h.text or "")
    console.print(table)
    if output is not None:
        from alignpipe.util.fsutil import atomic_write_bytes

        data = {"run": str(run), "store": str(opened.path), "query": value,
                "query_modality": query_modality, "k": k,
                "results": [h.to_dict() for h in hits]}
        atomic_write_bytes(output, json.dumps(data, indent=1).encode())
        console.print(f"wrote {output}")
    if html is not None:
        page = _gallery(html, run, opened.path, label, query_modality, value, hits,
                        opened.modality)
        console.print(f"wrote {page}")


def export(
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Argument(help="The folder to write the model into.")],
    push_to_hub: Annotated[str | None, typer.Option(
        "--push-to-hub", help="Also upload the folder to this Hugging Face model repo "
                              "(ORG/NAME).")] = None,
    private: Annotated[bool, typer.Option(help="Make the hub repo private.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in OUT.")] = False,
) -> None:
    """A self-contained model folder (encoder specs, heads, model card) that load_model reads
    without the cache, manifest or run folder."""
    from alignpipe.model import export_model
    from alignpipe.model import push_to_hub as push

    if push_to_hub is not None:
        from alignpipe.encoders.hub import hub_problem

        problem = hub_problem()  # before the export: fail fast, not after the work
        if problem:
            raise AlignpipeError(f"--push-to-hub {push_to_hub}: the hub is unreachable "
                                 f"({problem}); export without --push-to-hub and upload later")
    folder = export_model(run, out, overwrite=overwrite)
    console.print(f"exported {run} → {folder}")
    if push_to_hub is not None:
        console.print(f"pushed to {push(folder, push_to_hub, private=private)}")


def bench_search(
    rows: Annotated[int, typer.Option(help="Store rows.")] = 200_000,
    dim: Annotated[int, typer.Option(help="Latent dim.")] = 384,
    out_dim: Annotated[int, typer.Option(help="The head's output dim.")] = 256,
    queries: Annotated[int, typer.Option(help="Queries.")] = 200,
    quick: Annotated[bool, typer.Option(help="A small store (20k rows), 50 queries.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Exact search vs the approximate index: queries/s, build time and recall@10, in one
    run."""
    from alignpipe.app.benchmarks.search import run_search_bench
    from alignpipe.app.report import bench_table

    use_threads(threads)
    console.print(bench_table([{"bench": "search", **row} for row in run_search_bench(
        rows=rows, dim=dim, out_dim=out_dim, queries=queries, quick=quick)]))


def register(app: typer.Typer) -> None:
    app.command()(friendly(predict))
    app.command()(friendly(search))
    app.command()(friendly(export))
    bench = next(g.typer_instance for g in app.registered_groups if g.name == "bench")
    bench.command("search")(friendly(bench_search))
