"""`alignpipe eval`: retrieval and zero-shot on cached latents, for any pair of modalities.

Scores a fitted run (heads), an asif run (anchors), or, with ``identity=True``, two stores that
already share a space (CLIP's two towers). Results go to a JSON file plus a markdown table and a
plot beside it; every number is a percentage. Ties count against the query, and a non-finite
score is a miss (see metrics.py).

Default result names say what produced them, so two evals never overwrite each other's files:
``eval-{kind}-{split}[-{class embedding}][-identity]__{store}__{store}.json`` in the run folder
(in the working folder for ``identity``), where each store is named ``{parent}-{folder}`` of
its path (``cache/toy/minilm`` → ``toy-minilm``). A default file left by another eval of the
same name (stores under another cache root) is refused, not replaced; ``output`` picks any path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignpipe.errors import AlignpipeError
from alignpipe.fsutil import atomic_write_json, atomic_write_text
from alignpipe.latents import (
    ManifestArg,
    check_encoder,
    first_rows,
    load_rows,
    media_items,
    open_pair,
    partial_notes,
    resolve_device,
    split_rows,
    stage_two_store,
    storage_dtype,
    store_manifests,
    valid_rows,
)
from alignpipe.manifest import SPLITS, file_sha256
from alignpipe.methods.space import Encoded, group_mean, num_rows, pairwise_scores, slice_rows
from alignpipe.metrics import (
    TIE_RULE,
    class_ranks,
    confusion_matrix,
    encoded_ranks,
    nonfinite_rows,
    pessimistic_predictions,
    recall_curve,
    recalls_from_ranks,
    zeroshot_metrics,
)
from alignpipe.store import LatentStore

CLASS_EMBEDDINGS = {
    "mean": "CLIP: mean of the normalised template encodings of a class, renormalised",
    "max": "ASIF: a class scores the best of its templates",
}
ALL_ROWS = "all"
EVAL_SPLITS = (*SPLITS, ALL_ROWS)
QUERY_CHUNK = 2048
CONFUSION_MAX_CLASSES = 50


# ---- the space both stores are compared in ------------------------------------------------------
def open_space(run, identity: bool, stores: list[LatentStore],
               device: torch.device) -> tuple[Callable[[LatentStore, torch.Tensor], Encoded], dict]:
    """An encoder for each store's latents, plus what was used (for the results file).

    The info holds the run's name, method and the sha256 of the heads (or anchors) file scored,
    and, under ``_trained_on``, the sha256 of the manifest(s) the run was fitted on.
    """
    if identity:
        if run is not None:
            raise AlignpipeError("give either a run or --identity, not both")
        dims = {s.dim for s in stores}
        if len(dims) > 1:
            raise AlignpipeError(
                "--identity compares the stores' latents directly, so their dims must match; got "
                + ", ".join(f"{s.path} ({s.dim})" for s in stores))
        return (lambda store, x: F.normalize(x.float(), dim=-1)), {"identity": True,
                                                                   "_trained_on": set()}
    if run is None:
        raise AlignpipeError("give a run folder (--run RUN) or --identity for stores already in "
                             "one space")
    from alignpipe.fit import load_run
    from alignpipe.fit.runfolder import ANCHORS, HEADS_BEST

    loaded = load_run(run, device, stores=stores)  # an asif run's stores may have moved
    sides = {}
    for store in stores:
        side = loaded.side_of(store.modality)
        if side is None:
            trained = [loaded.identity["stores"][s]["modality"] for s in ("a", "b")]
            raise AlignpipeError(f"{store.path}: holds {store.modality} latents but run {run} "
                                 f"aligns {' and '.join(trained)}")
        check_encoder(store, loaded.identity["stores"][side]["encoder"], side)
        sides[store.path] = side
    weights = Path(run) / (HEADS_BEST if loaded.method.trained else ANCHORS)
    info = {"run": str(run), "run_name": Path(run).resolve().name,
            "method": loaded.identity["method"], "identity": False,
            "heads": {"file": weights.name,
                      "sha256": file_sha256(weights) if weights.exists() else None},
            "_trained_on": {loaded.identity["stores"][s].get("manifest_sha256")
                            for s in ("a", "b")}}
    return (lambda store, x: loaded.method.encode(sides[store.path], x)), info


def _encode_rows(encode, store: LatentStore, rows: np.ndarray, device: torch.device) -> Encoded:
    return encode(store, load_rows(store, rows, device, storage_dtype(device)))


def _check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise AlignpipeError(f"unknown split {split!r}; choose one of {', '.join(EVAL_SPLITS)} "
                             f"({ALL_ROWS!r} scores every row)")


def _rows_to_score(manifest, split: str, info: dict, hint: str = "") -> tuple[np.ndarray, str,
                                                                              list[str]]:
    """Rows of `split`, the sentence the results say about them, and warnings.

    A manifest without a split column has no test (or val, or train) rows: asking for one is
    refused rather than scoring every row, training rows included; ``all`` scores every row.
    """
    trained = manifest.sha256 in info["_trained_on"]
    run_rows = f"the rows the run in {info.get('run')} was fitted on" if trained else ""
    if split == ALL_ROWS:
        note = "all rows" + (f", including {run_rows}" if trained else "")
        warnings = [f"scored every row of {manifest.path.name}, including {run_rows}: not a "
                    f"held-out number"] if trained else []
        return np.arange(manifest.rows, dtype=np.int64), note, warnings
    if not manifest.has("split"):
        raise AlignpipeError(
            f"{manifest.path}: has no split column, so it has no {split!r} rows; ask for split "
            f"{ALL_ROWS!r} (--split {ALL_ROWS}, or split: {ALL_ROWS} in a pipeline) to score "
            f"every row" + (f" (including {run_rows})" if trained else "")
            + ", or give the manifest a split column (alignpipe manifest split)"
            + (f"; {hint}" if hint else ""))
    return split_rows(manifest, split), split, []


def _nonfinite(encodings: dict[str, Encoded], result: dict) -> None:
    """Count encodings holding NaN/inf (each scores as a miss) into the result, with a warning."""
    counts = {name: nonfinite_rows(enc) for name, enc in encodings.items()}
    result["nonfinite_rows"] = counts
    bad = {name: n for name, n in counts.items() if n}
    if bad:
        result.setdefault("warnings", []).append(
            "non-finite encodings (NaN/inf), each scored as a miss: "
            + ", ".join(f"{n} of {num_rows(encodings[name])} {name}" for name, n in bad.items()))


# ---- where results go ---------------------------------------------------------------------------
def store_tag(store: LatentStore) -> str:
    """``cache/toy/minilm`` → ``toy-minilm``: the part of a result name that names a store."""
    path = Path(store.path).resolve()
    tag = f"{path.parent.name}-{path.name}" if path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._+-]", "_", tag)


def result_name(kind: str, split: str, stores: list[LatentStore], options: list[str]) -> str:
    """The default result stem: kind, split, options that change the number, then the stores."""
    return "__".join(["-".join(["eval", kind, split, *options]),
                      *(store_tag(s) for s in stores)])


def _output_path(output, run, stem: str, produced_by) -> tuple[Path, dict]:
    """Where the result goes, and `produced_by(folder)`: what made it, paths relative to there."""
    path = Path(output) if output is not None else (
        (Path(run) if run is not None else Path.cwd()) / f"{stem}.json")
    made = produced_by(path.parent)
    if output is None:
        _refuse_foreign(path, made)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, made


def _refuse_foreign(path: Path, produced_by: dict) -> None:
    """A default-named result written by another eval (other stores, same names) stays."""
    try:
        old = json.loads(path.read_text()).get("produced_by")
    except (OSError, ValueError, AttributeError):
        return
    if old is not None and old != produced_by:
        raise AlignpipeError(
            f"{path}: holds the result of another eval ({old.get('stores')}); give --output to "
            f"write this one elsewhere")


def _produced_by(kind: str, split: str, run, stores: dict, **options) -> Callable[[Path], dict]:
    """What made a result, given the result's folder: run and store paths are recorded relative
    to it, so a project moved as a whole still recognises its own results."""
    def made(folder: Path) -> dict:
        def rel(p) -> str:
            return os.path.relpath(Path(p).resolve(), Path(folder).resolve())
        return {"kind": kind, "split": split, "run": rel(run) if run else None,
                "stores": {k: rel(s.path) for k, s in stores.items()}, **options}
    return made


def _public(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def _header_lines(result: dict, title: str) -> list[str]:
    source = result.get("run") or "identity (stores already share a space)"
    lines = [f"# {title}: {source}", ""]
    if result.get("heads"):
        lines += [f"Method {result['method']}; {result['heads']['file']} sha256 "
                  f"{str(result['heads']['sha256'])[:16]}….", ""]
    lines += [f"**Warning:** {w}" for w in result.get("warnings", [])]
    return lines + ([""] if result.get("warnings") else [])


# ---- retrieval ----------------------------------------------------------------------------------
def eval_retrieval(run, store_a, store_b, *, split: str = "test", identity: bool = False,
                   output=None, device=None, manifest: ManifestArg = None,
                   allow_partial: bool = False) -> dict:
    """R@1/5/10 both ways; rows sharing a media item are one item (any of its captions hits).

    `manifest` says where the stores' manifest is now (when it moved without them);
    `allow_partial` scores unfinished stores on the rows embedded so far.
    """
    _check_split(split)
    a, b, manifest = open_pair(store_a, store_b, manifest=manifest, allow_partial=allow_partial)
    dev = resolve_device(device)
    encode, info = open_space(run, identity, [a, b], dev)
    rows, note, warnings = _rows_to_score(manifest, split, info)
    produced_by = _produced_by("retrieval", split, run, {"a": a, "b": b})
    stem = result_name("retrieval", split, [a, b], ["identity"] if identity else [])
    path, produced_by = _output_path(output, run, stem, produced_by)
    kept, _ = valid_rows([a, b], rows)
    if kept.size == 0:
        raise AlignpipeError(f"no rows of split {split!r} are valid in both {a.path} and "
                             f"{b.path}")
    items_a = media_items(manifest, a.modality, kept)
    items_b = media_items(manifest, b.modality, kept)
    enc_a = _encode_rows(encode, a, kept[first_rows(items_a)], dev)
    enc_b = _encode_rows(encode, b, kept[first_rows(items_b)], dev)
    forward, backward = encoded_ranks(enc_a, enc_b, items_a, items_b, chunk=QUERY_CHUNK)
    ab, ba = f"{a.modality}_to_{b.modality}", f"{b.modality}_to_{a.modality}"
    result = {ab: recalls_from_ranks(forward), ba: recalls_from_ranks(backward)}
    result["mean_recall"] = float(np.mean([*result[ab].values(), *result[ba].values()]))
    result.update({
        "split": note, "pairs": int(kept.size),
        "items": {a.modality: num_rows(enc_a), b.modality: num_rows(enc_b)},
        "dropped_invalid": int(rows.size - kept.size), "tie_rule": TIE_RULE,
        "stores": {a.modality: str(a.path), b.modality: str(b.path)}, **_public(info)})
    if notes := partial_notes([a, b]):
        result["partial"] = notes
    if warnings:
        result["warnings"] = warnings
    _nonfinite({a.modality: enc_a, b.modality: enc_b}, result)
    result.update({"produced_by": produced_by, "output": str(path)})
    curves = {ab: recall_curve(forward, min(100, num_rows(enc_b))).tolist(),
              ba: recall_curve(backward, min(100, num_rows(enc_a))).tolist()}
    _write_retrieval(path, result, curves, (ab, ba))
    return result


def _write_retrieval(path: Path, result: dict, curves: dict, directions: tuple[str, str]):
    from alignpipe.render import markdown_table, plot_recall_curves

    _write_json(path, result)
    lines = [*_header_lines(result, "Retrieval"),
             f"Split {result['split']}: {result['pairs']} pairs, "
             + ", ".join(f"{n} {m} items" for m, n in result["items"].items())
             + f". Recall in percent; ties {TIE_RULE.split(':')[0]}.", "",
             markdown_table(["direction", "R@1", "R@5", "R@10"],
                            [[d.replace("_", " "), *result[d].values()] for d in directions]),
             ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))
    plot_recall_curves(path.with_suffix(".png"), curves, f"recall@K, {result['split']}")


# ---- zero-shot ----------------------------------------------------------------------------------
def class_key(query_manifest, prompts_manifest) -> str:
    """``class_id`` when both manifests carry one (names may repeat), else ``label``."""
    if query_manifest.has("class_id") and prompts_manifest.has("class_id"):
        return "class_id"
    for manifest, role in ((prompts_manifest, "prompts"), (query_manifest, "query")):
        if not manifest.has("label"):
            raise AlignpipeError(
                f"{manifest.path}: zero-shot needs a 'label' (or, in both manifests, a "
                f"'class_id') column in the {role} manifest"
                + (" (the class of each template row)" if role == "prompts" else ""))
    return "label"


def _keys(manifest, key: str) -> list[str | None]:
    return [None if v is None else str(v) for v in manifest.column(key)]


def _prompt_classes(prompts: LatentStore, manifest,
                    key: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Valid prompt rows, their class index, class keys in order of first appearance, and a
    display name per class (the label; repeated labels get their class_id added)."""
    keys = _keys(manifest, key)
    empty = [r for r, k in enumerate(keys) if k in (None, "")]
    if empty:
        raise AlignpipeError(f"{manifest.path}: prompt row {empty[0]} has no {key} "
                             f"({len(empty)} such row(s))")
    rows, _ = valid_rows([prompts], np.arange(prompts.rows))
    classes = list(dict.fromkeys(keys))
    present = {keys[r] for r in rows}
    missing = [c for c in classes if c not in present]
    if missing:
        raise AlignpipeError(f"{prompts.path}: no valid prompt row for class(es) "
                             f"{', '.join(map(repr, missing[:5]))}")
    index = {c: i for i, c in enumerate(classes)}
    names = classes
    if key == "class_id" and manifest.has("label"):
        labels = manifest.column("label")
        first = {}
        for r, k in enumerate(keys):
            first.setdefault(k, labels[r] if labels[r] not in (None, "") else k)
        shown = [str(first[c]) for c in classes]
        repeated = {n for n in shown if shown.count(n) > 1}
        names = [f"{n} ({c})" if n in repeated else n for n, c in zip(shown, classes,
                                                                      strict=True)]
    return rows, np.array([index[keys[r]] for r in rows], dtype=np.int64), classes, names


def _query_labels(manifest, rows: np.ndarray, classes: list[str], key: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    keys = _keys(manifest, key)
    values = [keys[r] for r in rows]
    unknown = sorted({str(v) for v in values if v not in index})
    if unknown:
        raise AlignpipeError(
            f"{manifest.path}: {len(unknown)} query {key}(s) have no prompts, e.g. "
            f"{', '.join(map(repr, unknown[:5]))}; prompts cover {len(classes)} classes")
    return np.array([index[v] for v in values], dtype=np.int64)


def _refuse_swapped(q: LatentStore, p: LatentStore, q_manifest, p_manifest) -> None:
    """Refuse a prompts store given as the query (the two stores in the wrong order)."""
    looks_swapped = (q.modality == "text" and p.modality != "text") or (
        p_manifest.has("split") and not q_manifest.has("split"))
    if looks_swapped:
        raise AlignpipeError(
            f"{q.path} looks like a prompts store given as the query ({q.modality} rows of "
            f"{q_manifest.path.name}"
            + ("" if q_manifest.has("split") else ", which has no split")
            + f"; {p.path} holds {p.modality} rows"
            + (f" of {p_manifest.path.name}, which has splits" if p_manifest.has("split") else "")
            + "): give the store to classify first and the text prompts store second")


def class_scores(queries: Encoded, prompts: Encoded, prompt_class: torch.Tensor, n_classes: int,
                 class_embedding: str) -> Callable[[int, int], torch.Tensor]:
    """Scores of query rows [start, stop) against every class, by the chosen protocol."""
    if class_embedding == "mean":
        classes = group_mean(prompts, prompt_class, n_classes)
        return lambda s, e: pairwise_scores(slice_rows(queries, s, e), classes)

    def best_template(start: int, stop: int) -> torch.Tensor:
        scores = pairwise_scores(slice_rows(queries, start, stop), prompts)
        out = torch.full((scores.shape[0], n_classes), -torch.inf, device=scores.device)
        index = prompt_class.to(scores.device).expand(scores.shape[0], -1)
        return out.scatter_reduce_(1, index, scores, reduce="amax")

    return best_template


def eval_zeroshot(run, query_store, prompts_store, *, split: str = "test",
                  class_embedding: str = "mean", identity: bool = False, output=None,
                  device=None, manifest: ManifestArg = None, allow_partial: bool = False) -> dict:
    """Top-1/top-5 accuracy of classifying query items by their best-scoring class.

    `manifest` (one path or a list: the query's and the prompts' manifests) says where moved
    manifests are now; `allow_partial` scores unfinished stores on the rows embedded so far.

    Classes are keyed by ``class_id`` when both manifests have that column (ImageNet's two
    "missile" and two "sunglasses" classes stay apart), otherwise by ``label``.
    """
    if class_embedding not in CLASS_EMBEDDINGS:
        raise AlignpipeError(f"class embedding must be mean (CLIP) or max (ASIF), got "
                             f"{class_embedding!r}")
    _check_split(split)
    q, p = (stage_two_store(s, allow_partial=allow_partial)
            for s in (query_store, prompts_store))
    if q.modality == p.modality:
        raise AlignpipeError(f"{q.path} and {p.path} both hold {q.modality} latents; zero-shot "
                             f"classifies one modality by prompts of another")
    q_manifest, p_manifest = store_manifests([q, p], manifest)
    _refuse_swapped(q, p, q_manifest, p_manifest)
    key = class_key(q_manifest, p_manifest)
    dev = resolve_device(device)
    encode, info = open_space(run, identity, [q, p], dev)
    prompt_rows, prompt_class, classes, names = _prompt_classes(p, p_manifest, key)
    rows, note, warnings = _rows_to_score(q_manifest, split, info)
    produced_by = _produced_by("zeroshot", split, run, {"query": q, "prompts": p},
                               class_embedding=class_embedding)
    stem = result_name("zeroshot", split, [q, p],
                       [class_embedding, *(["identity"] if identity else [])])
    path, produced_by = _output_path(output, run, stem, produced_by)
    valid, _ = valid_rows([q], rows)
    if valid.size == 0:
        raise AlignpipeError(f"no valid rows of split {split!r} in {q.path}")
    kept = valid[first_rows(media_items(q_manifest, q.modality, valid))]  # each item once
    labels = torch.as_tensor(_query_labels(q_manifest, kept, classes, key))
    enc_q = _encode_rows(encode, q, kept, dev)
    enc_p = _encode_rows(encode, p, prompt_rows, dev)
    score = class_scores(enc_q, enc_p, torch.as_tensor(prompt_class), len(classes),
                         class_embedding)
    ranks, predictions = [], []
    for start in range(0, kept.size, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, kept.size)
        scores, truth = score(start, stop).cpu(), labels[start:stop]
        ranks.append(class_ranks(scores, truth))
        predictions.append(pessimistic_predictions(scores, truth))
    ranks_t, preds_t = torch.cat(ranks), torch.cat(predictions)
    result = zeroshot_metrics(ranks_t, labels, names)
    if key == "label" and (q_manifest.has("class_id") or p_manifest.has("class_id")):
        only = "query" if q_manifest.has("class_id") else "prompts"
        warnings.append(f"only the {only} manifest has a class_id column, so classes are keyed "
                        f"by label: classes sharing a name are merged")
    result.update({
        "split": note, "queries": int(kept.size),
        "classes": len(classes), "class_key": key, "prompts": int(prompt_rows.size),
        "dropped_invalid": int(rows.size - valid.size),
        "class_embedding": class_embedding, "protocol": CLASS_EMBEDDINGS[class_embedding],
        "tie_rule": TIE_RULE,
        "stores": {"query": str(q.path), "prompts": str(p.path)}, **_public(info)})
    if notes := partial_notes([q, p]):
        result["partial"] = notes
    if warnings:
        result["warnings"] = warnings
    _nonfinite({"query": enc_q, "prompt": enc_p}, result)
    result.update({"produced_by": produced_by, "output": str(path)})
    _write_zeroshot(path, result, confusion_matrix(preds_t, labels, len(classes)), names)
    return result


def _write_zeroshot(path: Path, result: dict, confusion: np.ndarray, names: list[str]) -> None:
    from alignpipe.render import markdown_table, plot_confusion

    _write_json(path, result)
    lines = [*_header_lines(result, "Zero-shot"),
             f"Split {result['split']}: {result['queries']} queries, {result['classes']} "
             f"classes (keyed by {result['class_key']}), class embedding "
             f"{result['class_embedding']} ({result['protocol']}). "
             f"Accuracy in percent; ties {TIE_RULE.split(':')[0]}.", "",
             markdown_table(["top1", "top5", "mean per-class top1"],
                            [[result["top1"], result["top5"],
                              result.get("mean_per_class_top1", float("nan"))]]), "",
             "## Per class", "",
             markdown_table(["class", "top1"],
                            [[k, v] for k, v in result["per_class_accuracy"].items()]), ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))
    if len(names) <= CONFUSION_MAX_CLASSES:
        plot_confusion(path.with_suffix(".png"), confusion, names,
                       f"zero-shot, {result['split']} (top-1 {result['top1']:.1f}%)")
