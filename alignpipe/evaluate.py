"""`alignpipe eval`: retrieval and zero-shot on cached latents, for any pair of modalities.

Scores a fitted run (heads), an asif run (anchors), or, with ``identity=True``, two stores that
already share a space (CLIP's two towers). Results go to a JSON file plus a markdown table and a
plot beside it; every number is a percentage. Ties count against the query (see metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignpipe.errors import AlignpipeError
from alignpipe.fsutil import atomic_write_json
from alignpipe.latents import (
    as_store,
    check_encoder,
    first_rows,
    media_items,
    open_pair,
    read_rows,
    resolve_device,
    split_rows,
    storage_dtype,
    store_manifest,
    to_device,
    valid_rows,
)
from alignpipe.methods.space import Encoded, group_mean, num_rows, pairwise_scores, slice_rows
from alignpipe.metrics import (
    TIE_RULE,
    class_ranks,
    confusion_matrix,
    encoded_ranks,
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
QUERY_CHUNK = 2048
CONFUSION_MAX_CLASSES = 50


# ---- the space both stores are compared in ------------------------------------------------------
def open_space(run, identity: bool, stores: list[LatentStore],
               device: torch.device) -> tuple[Callable[[LatentStore, torch.Tensor], Encoded], dict]:
    """An encoder for each store's latents, plus what was used (for the results file)."""
    if identity:
        if run is not None:
            raise AlignpipeError("give either a run or --identity, not both")
        dims = {s.dim for s in stores}
        if len(dims) > 1:
            raise AlignpipeError(
                "--identity compares the stores' latents directly, so their dims must match; got "
                + ", ".join(f"{s.path} ({s.dim})" for s in stores))
        return (lambda store, x: F.normalize(x.float(), dim=-1)), {"identity": True}
    if run is None:
        raise AlignpipeError("give a run folder (--run RUN) or --identity for stores already in "
                             "one space")
    from alignpipe.fit import load_run

    loaded = load_run(run, device)
    sides = {}
    for store in stores:
        side = loaded.side_of(store.modality)
        if side is None:
            trained = [loaded.identity["stores"][s]["modality"] for s in ("a", "b")]
            raise AlignpipeError(f"{store.path}: holds {store.modality} latents but run {run} "
                                 f"aligns {' and '.join(trained)}")
        check_encoder(store, loaded.identity["stores"][side]["encoder"], side)
        sides[store.path] = side
    info = {"run": str(run), "method": loaded.identity["method"], "identity": False}
    return (lambda store, x: loaded.method.encode(sides[store.path], x)), info


def _encode_rows(encode, store: LatentStore, rows: np.ndarray, device: torch.device) -> Encoded:
    latents = to_device(read_rows(store, rows), device, storage_dtype(device))
    return encode(store, latents)


def _split_note(manifest, split: str) -> str:
    return split if manifest.has("split") else f"all rows ({manifest.path.name} has no split)"


# ---- retrieval ----------------------------------------------------------------------------------
def eval_retrieval(run, store_a, store_b, *, split: str = "test", identity: bool = False,
                   output=None, device=None) -> dict:
    """R@1/5/10 both ways; rows sharing a media item are one item (any of its captions hits)."""
    a, b, manifest = open_pair(store_a, store_b)
    dev = resolve_device(device)
    encode, info = open_space(run, identity, [a, b], dev)
    rows = split_rows(manifest, split)
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
        "split": _split_note(manifest, split), "pairs": int(kept.size),
        "items": {a.modality: num_rows(enc_a), b.modality: num_rows(enc_b)},
        "dropped_invalid": int(rows.size - kept.size), "tie_rule": TIE_RULE,
        "stores": {a.modality: str(a.path), b.modality: str(b.path)}, **info})
    path = _output_path(output, run, f"eval-retrieval-{split}")
    curves = {ab: recall_curve(forward, min(100, num_rows(enc_b))).tolist(),
              ba: recall_curve(backward, min(100, num_rows(enc_a))).tolist()}
    _write_retrieval(path, result, curves, (ab, ba))
    return result


def _output_path(output, run, stem: str) -> Path:
    if output is not None:
        path = Path(output)
    elif run is not None:
        path = Path(run) / f"{stem}.json"
    else:
        path = Path(f"{stem}-identity.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def _write_retrieval(path: Path, result: dict, curves: dict, directions: tuple[str, str]):
    from alignpipe.report import markdown_table, plot_recall_curves

    _write_json(path, result)
    source = result.get("run") or "identity (stores already share a space)"
    lines = [f"# Retrieval: {source}", "",
             f"Split {result['split']}: {result['pairs']} pairs, "
             + ", ".join(f"{n} {m} items" for m, n in result["items"].items())
             + f". Recall in percent; ties {TIE_RULE.split(':')[0]}.", "",
             markdown_table(["direction", "R@1", "R@5", "R@10"],
                            [[d.replace("_", " "), *result[d].values()] for d in directions]),
             ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    plot_recall_curves(path.with_suffix(".png"), curves, f"recall@K, {result['split']}")


# ---- zero-shot ----------------------------------------------------------------------------------
def _prompt_classes(prompts: LatentStore, manifest) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Valid prompt rows, their class index, and class names in order of first appearance."""
    if not manifest.has("label"):
        raise AlignpipeError(f"{manifest.path}: a prompts manifest needs a 'label' column (the "
                             f"class of each template row)")
    rows, _ = valid_rows([prompts], np.arange(prompts.rows))
    labels = manifest.column("label")
    names = list(dict.fromkeys(labels))
    present = {labels[r] for r in rows}
    missing = [n for n in names if n not in present]
    if missing:
        raise AlignpipeError(f"{prompts.path}: no valid prompt row for class(es) "
                             f"{', '.join(map(repr, missing[:5]))}")
    index = {n: i for i, n in enumerate(names)}
    return rows, np.array([index[labels[r]] for r in rows], dtype=np.int64), names


def _query_labels(manifest, rows: np.ndarray, names: list[str]) -> np.ndarray:
    if not manifest.has("label"):
        raise AlignpipeError(f"{manifest.path}: zero-shot needs a 'label' column in the query "
                             f"manifest")
    index = {n: i for i, n in enumerate(names)}
    labels = [manifest.column("label")[r] for r in rows]
    unknown = sorted({str(v) for v in labels if v not in index})
    if unknown:
        raise AlignpipeError(
            f"{manifest.path}: {len(unknown)} query label(s) have no prompts, e.g. "
            f"{', '.join(map(repr, unknown[:5]))}; prompts cover {len(names)} classes")
    return np.array([index[v] for v in labels], dtype=np.int64)


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
                  device=None) -> dict:
    """Top-1/top-5 accuracy of classifying query items by their best-scoring class."""
    if class_embedding not in CLASS_EMBEDDINGS:
        raise AlignpipeError(f"class embedding must be mean (CLIP) or max (ASIF), got "
                             f"{class_embedding!r}")
    q, p = as_store(query_store), as_store(prompts_store)
    if q.modality == p.modality:
        raise AlignpipeError(f"{q.path} and {p.path} both hold {q.modality} latents; zero-shot "
                             f"classifies one modality by prompts of another")
    q_manifest, p_manifest = store_manifest(q), store_manifest(p)
    dev = resolve_device(device)
    encode, info = open_space(run, identity, [q, p], dev)
    prompt_rows, prompt_class, names = _prompt_classes(p, p_manifest)
    rows = split_rows(q_manifest, split)
    valid, _ = valid_rows([q], rows)
    if valid.size == 0:
        raise AlignpipeError(f"no valid rows of split {split!r} in {q.path}")
    kept = valid[first_rows(media_items(q_manifest, q.modality, valid))]  # each item once
    labels = torch.as_tensor(_query_labels(q_manifest, kept, names))
    enc_q = _encode_rows(encode, q, kept, dev)
    enc_p = _encode_rows(encode, p, prompt_rows, dev)
    score = class_scores(enc_q, enc_p, torch.as_tensor(prompt_class), len(names),
                         class_embedding)
    ranks, predictions = [], []
    for start in range(0, kept.size, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, kept.size)
        scores, truth = score(start, stop).cpu(), labels[start:stop]
        ranks.append(class_ranks(scores, truth))
        predictions.append(pessimistic_predictions(scores, truth))
    ranks_t, preds_t = torch.cat(ranks), torch.cat(predictions)
    result = zeroshot_metrics(ranks_t, labels, names)
    result.update({
        "split": _split_note(q_manifest, split), "queries": int(kept.size),
        "classes": len(names), "prompts": int(prompt_rows.size),
        "dropped_invalid": int(rows.size - valid.size),
        "class_embedding": class_embedding, "protocol": CLASS_EMBEDDINGS[class_embedding],
        "tie_rule": TIE_RULE,
        "stores": {"query": str(q.path), "prompts": str(p.path)}, **info})
    path = _output_path(output, run, f"eval-zeroshot-{split}")
    _write_zeroshot(path, result, confusion_matrix(preds_t, labels, len(names)), names)
    return result


def _write_zeroshot(path: Path, result: dict, confusion: np.ndarray, names: list[str]) -> None:
    from alignpipe.report import markdown_table, plot_confusion

    _write_json(path, result)
    source = result.get("run") or "identity (stores already share a space)"
    lines = [f"# Zero-shot: {source}", "",
             f"Split {result['split']}: {result['queries']} queries, {result['classes']} "
             f"classes, class embedding {result['class_embedding']} ({result['protocol']}). "
             f"Accuracy in percent; ties {TIE_RULE.split(':')[0]}.", "",
             markdown_table(["top1", "top5", "mean per-class top1"],
                            [[result["top1"], result["top5"],
                              result.get("mean_per_class_top1", float("nan"))]]), "",
             "## Per class", "",
             markdown_table(["class", "top1"],
                            [[k, v] for k, v in result["per_class_accuracy"].items()]), ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    if len(names) <= CONFUSION_MAX_CLASSES:
        plot_confusion(path.with_suffix(".png"), confusion, names,
                       f"zero-shot, {result['split']} (top-1 {result['top1']:.1f}%)")
