"""Retrieval: recall@1/5/10 both ways between two stores of one manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alignpipe.data.pairing import (
    ManifestArg,
    first_rows,
    media_items,
    open_pair,
    partial_notes,
    resolve_device,
    valid_rows,
)
from alignpipe.evaluate.common import (
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
from alignpipe.evaluate.metrics import TIE_RULE, encoded_ranks, recall_curve, recalls_from_ranks
from alignpipe.evaluate.registry import Evaluation, Figure, Table, register_evaluator
from alignpipe.methods.space import num_rows
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from alignpipe.data.store import LatentStore


@register_evaluator("retrieval", stores=("a", "b"),
                    description="recall@1/5/10 both ways between two stores")
def compute_retrieval(run: str | Path | None, store_a: str | Path | LatentStore,
                      store_b: str | Path | LatentStore, *,
                      split: str = "test", identity: bool = False,
                      device: str | torch.device | None = None, manifest: ManifestArg = None,
                      allow_partial: bool = False) -> Evaluation:
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
    curves = {ab: recall_curve(forward, min(100, num_rows(enc_b))).tolist(),
              ba: recall_curve(backward, min(100, num_rows(enc_a))).tolist()}
    summary = (f"Split {result['split']}: {result['pairs']} pairs, "
               + ", ".join(f"{n} {m} items" for m, n in result["items"].items())
               + f". Recall in percent; ties {TIE_RULE.split(':')[0]}.")
    table = Table(["direction", "R@1", "R@5", "R@10"],
                  [[d.replace("_", " "), *result[d].values()] for d in (ab, ba)])
    return Evaluation(result, stem, produced_by, "Retrieval", summary, [table],
                      Figure("recall_curves", {"curves": curves},
                             f"recall@K, {result['split']}"))

