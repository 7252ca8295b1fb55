"""Zero-shot: classify the rows of one store by their best-scoring class of text prompts."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from alignpipe.data.pairing import (
    ManifestArg,
    first_rows,
    media_items,
    partial_notes,
    resolve_device,
    stage_two_store,
    store_manifests,
    valid_rows,
)
from alignpipe.data.store import LatentStore
from alignpipe.evaluate.common import (
    CLASS_EMBEDDINGS,
    CONFUSION_MAX_CLASSES,
    QUERY_CHUNK,
    _check_split,
    _encode_rows,
    _nonfinite,
    _produced_by,
    _public,
    _rows_to_score,
    open_space,
    result_name,
)
from alignpipe.evaluate.metrics import (
    TIE_RULE,
    class_ranks,
    confusion_matrix,
    pessimistic_predictions,
    zeroshot_metrics,
)
from alignpipe.evaluate.registry import Evaluation, Figure, Table, register_evaluator
from alignpipe.methods.space import Encoded, group_mean, pairwise_scores, slice_rows
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from pathlib import Path

    from alignpipe.data.manifest import Manifest


def class_key(query_manifest: Manifest, prompts_manifest: Manifest) -> str:
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


def _keys(manifest: Manifest, key: str) -> list[str | None]:
    return [None if v is None else str(v) for v in manifest.column(key)]


def _prompt_classes(prompts: LatentStore, manifest: Manifest,
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


def _query_labels(manifest: Manifest, rows: np.ndarray, classes: list[str], key: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    keys = _keys(manifest, key)
    values = [keys[r] for r in rows]
    unknown = sorted({str(v) for v in values if v not in index})
    if unknown:
        raise AlignpipeError(
            f"{manifest.path}: {len(unknown)} query {key}(s) have no prompts, e.g. "
            f"{', '.join(map(repr, unknown[:5]))}; prompts cover {len(classes)} classes")
    return np.array([index[v] for v in values], dtype=np.int64)


def _refuse_swapped(q: LatentStore, p: LatentStore, q_manifest: Manifest,
                    p_manifest: Manifest) -> None:
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


@register_evaluator("zeroshot", stores=("query", "prompts"), options={"class_embedding": "mean"},
                    description="top-1/top-5 classification of a store by text prompts")
def compute_zeroshot(run: str | Path | None, query_store: str | Path | LatentStore,
                     prompts_store: str | Path | LatentStore, *,
                     split: str = "test", class_embedding: str = "mean", identity: bool = False,
                     device: str | torch.device | None = None,
                     manifest: ManifestArg = None, allow_partial: bool = False) -> Evaluation:
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
    summary = (f"Split {result['split']}: {result['queries']} queries, {result['classes']} "
               f"classes (keyed by {result['class_key']}), class embedding "
               f"{result['class_embedding']} ({result['protocol']}). "
               f"Accuracy in percent; ties {TIE_RULE.split(':')[0]}.")
    tables = [Table(["top1", "top5", "mean per-class top1"],
                    [[result["top1"], result["top5"],
                      result.get("mean_per_class_top1", float("nan"))]]),
              Table(["class", "top1"], [[k, v] for k, v in result["per_class_accuracy"].items()],
                    heading="Per class")]
    figure = None
    if len(names) <= CONFUSION_MAX_CLASSES:
        figure = Figure("confusion", {"matrix": confusion_matrix(preds_t, labels, len(classes)),
                                      "names": names},
                        f"zero-shot, {result['split']} (top-1 {result['top1']:.1f}%)")
    return Evaluation(result, stem, produced_by, "Zero-shot", summary, tables, figure)

