"""Retrieval and zero-shot metrics as pure functions: scores and correspondence in, numbers out.

Ties are counted against the query (pessimistic): a wrong candidate that scores exactly as high
as the best correct one ranks above it. A constant scorer therefore gets R@K = 0 unless K
reaches past every wrong candidate, instead of getting credit for the order rows came in.

A score that is not finite (NaN, +inf or -inf, e.g. from a diverged run) is a miss: it ranks below
every finite score, and ties with the other non-finite ones count against the query as above. So
all-NaN encodings give R@K = 0 (unless K reaches every candidate) and every class rank last.

Every percentage is of queries: ``100 · hits / queries``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from alignpipe.methods.space import Encoded

TIE_RULE = ("pessimistic: a wrong candidate scoring exactly as high as the best correct one "
            "ranks above it; a non-finite score ranks below every finite one")
RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """`scores` with every NaN and ±inf replaced by -inf: the worst score there is.

    A NaN compares false with everything, so `scores >= best` would rank a NaN positive first.
    """
    return torch.where(torch.isfinite(scores), scores,
                       torch.full((), -torch.inf, dtype=scores.dtype, device=scores.device))


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best-scoring positive among its candidates.

    `scores` is queries × candidates; `positives` a bool mask of the same shape with at least one
    True per row. Rank = 1 + number of negatives scoring ≥ the best positive (pessimistic ties);
    non-finite scores count as -inf, so a query whose positives are all non-finite ranks last.
    """
    if positives.shape != scores.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must match scores "
                         f"{tuple(scores.shape)}")
    if scores.shape[0] and not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    scores = finite_scores(scores)
    best = scores.masked_fill(~positives, -torch.inf).amax(dim=1, keepdim=True)
    return 1 + ((scores >= best) & ~positives).sum(dim=1)


def recalls_from_ranks(ranks: torch.Tensor | np.ndarray,
                       ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[str, float]:
    """``{"R@1": percent of ranks ≤ 1, ...}``."""
    ranks = torch.as_tensor(ranks)
    n = max(1, ranks.numel())
    return {f"R@{k}": 100.0 * float((ranks <= k).sum()) / n for k in ks}


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor,
                ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[str, float]:
    return recalls_from_ranks(positive_ranks(scores, positives), ks)


def recall_curve(ranks: torch.Tensor, max_k: int) -> np.ndarray:
    """R@K in percent for K = 1..max_k."""
    ranks = torch.as_tensor(ranks).cpu().numpy()
    counts = np.bincount(np.clip(ranks, 1, max_k + 1), minlength=max_k + 2)[1:max_k + 1]
    return 100.0 * np.cumsum(counts) / max(1, ranks.size)


# ---- correspondence -----------------------------------------------------------------------------
@dataclass
class Links:
    """Which query items are correct for which candidate items (a sparse bipartite relation).

    Built from paired rows: row r links query item ``query[r]`` with candidate item
    ``candidate[r]``. Duplicate links (several captions of one image) are harmless.
    """

    query: np.ndarray
    candidate: np.ndarray
    n_query: int
    n_candidate: int

    @classmethod
    def from_rows(cls, query_items: np.ndarray, candidate_items: np.ndarray) -> Links:
        q = np.asarray(query_items, dtype=np.int64)
        c = np.asarray(candidate_items, dtype=np.int64)
        order = np.argsort(q, kind="stable")
        return cls(q[order], c[order], int(q.max(initial=-1)) + 1, int(c.max(initial=-1)) + 1)

    def reversed(self) -> Links:
        return Links.from_rows(self.candidate, self.query)

    def mask(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positives of query items [start, stop) as a bool mask over all candidates."""
        lo, hi = np.searchsorted(self.query, [start, stop])
        out = torch.zeros(stop - start, self.n_candidate, dtype=torch.bool, device=device)
        out[torch.as_tensor(self.query[lo:hi] - start, device=device),
            torch.as_tensor(self.candidate[lo:hi], device=device)] = True
        return out


def chunked_ranks(score_rows: Callable[[int, int], torch.Tensor], links: Links,
                  chunk: int = 4096) -> torch.Tensor:
    """Ranks of every query item, scoring `chunk` queries at a time.

    `score_rows(start, stop)` returns the scores of query items [start, stop) against all
    candidates, so a 25k × 5k (or larger) problem never needs its whole matrix at once.
    """
    out = []
    for start in range(0, links.n_query, chunk):
        stop = min(start + chunk, links.n_query)
        scores = score_rows(start, stop)
        out.append(positive_ranks(scores, links.mask(start, stop, scores.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ---- zero-shot ----------------------------------------------------------------------------------
def class_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true class: 1 + classes scoring ≥ it (pessimistic ties).

    Non-finite scores count as -inf: a non-finite true score ranks last.
    """
    scores = finite_scores(scores)
    true = scores.gather(1, labels.view(-1, 1))
    return (scores >= true).sum(dim=1)


def pessimistic_predictions(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Predicted class per query, breaking ties at the top against the true class.

    Consistent with `class_ranks`: the prediction equals the label exactly when its rank is 1.
    """
    scores = finite_scores(scores)
    top = scores == scores.amax(dim=1, keepdim=True)
    wrong_top = top.clone()
    wrong_top[torch.arange(scores.shape[0]), labels] = False
    first_wrong = wrong_top.float().argmax(dim=1)
    return torch.where(wrong_top.any(dim=1), first_wrong, labels)


def zeroshot_metrics(ranks: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                     ks: tuple[int, ...] = ZEROSHOT_KS) -> dict:
    """top-k accuracy over all queries, and top-1 accuracy per class (classes with queries)."""
    ranks, labels = torch.as_tensor(ranks).cpu(), torch.as_tensor(labels).cpu()
    n = max(1, ranks.numel())
    out: dict = {f"top{k}": 100.0 * float((ranks <= k).sum()) / n for k in ks}
    per_class = {}
    for c, name in enumerate(class_names):
        members = labels == c
        if members.any():
            per_class[name] = 100.0 * float((ranks[members] == 1).double().mean())
    out["per_class_accuracy"] = per_class
    if per_class:
        out["mean_per_class_top1"] = float(np.mean(list(per_class.values())))
    return out


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, n: int) -> np.ndarray:
    """counts[true, predicted]."""
    flat = labels.cpu().numpy() * n + predictions.cpu().numpy()
    return np.bincount(flat, minlength=n * n).reshape(n, n)


# ---- on encodings -------------------------------------------------------------------------------
def nonfinite_rows(enc: Encoded) -> int:
    """How many rows of an encoding (dense tensor or `SparseRows`) hold a NaN or inf."""
    from alignpipe.methods.space import SparseRows

    if isinstance(enc, SparseRows):
        bad = ~torch.isfinite(enc.values)
        return int(torch.unique(enc.row_ids()[bad]).numel()) if bool(bad.any()) else 0
    if enc.numel() == 0:
        return 0
    return int((~torch.isfinite(enc)).reshape(enc.shape[0], -1).any(dim=1).sum())


def encoded_ranks(enc_a: Encoded, enc_b: Encoded, items_a: np.ndarray, items_b: np.ndarray,
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks a→b per item of a and b→a per item of b.

    `enc_a` holds one encoding per item of side a (item order), likewise `enc_b`; row r of the
    evaluated pairs links item ``items_a[r]`` with item ``items_b[r]``.
    """
    from alignpipe.methods.space import pairwise_scores, slice_rows

    links = Links.from_rows(items_a, items_b)
    forward = chunked_ranks(lambda s, e: pairwise_scores(slice_rows(enc_a, s, e), enc_b),
                            links, chunk)
    backward = chunked_ranks(lambda s, e: pairwise_scores(slice_rows(enc_b, s, e), enc_a),
                             links.reversed(), chunk)
    return forward, backward


def encoded_retrieval(enc_a: Encoded, enc_b: Encoded, items_a: np.ndarray, items_b: np.ndarray,
                      ks: tuple[int, ...] = RETRIEVAL_KS) -> tuple[dict, dict]:
    forward, backward = encoded_ranks(enc_a, enc_b, items_a, items_b)
    return recalls_from_ranks(forward, ks), recalls_from_ranks(backward, ks)
