"""Issue 8, metrics and eval: non-finite scores are misses, ImageNet's repeated class names stay
apart, no split means no test rows, results name the heads and options that produced them."""

from __future__ import annotations

import math

import numpy as np
import torch
from typer.testing import CliRunner

from alignpipe.metrics import (
    Links,
    chunked_ranks,
    class_ranks,
    encoded_ranks,
    nonfinite_rows,
    pessimistic_predictions,
    positive_ranks,
    recall_at_k,
    zeroshot_metrics,
)

runner = CliRunner()
NAN, INF = float("nan"), float("inf")


# ---- item 1: non-finite scores are misses -------------------------------------------------------
def brute_rank(scores, positive) -> int:
    """Sort candidates best first, non-finite as the worst score, negatives first among equals."""
    worst = [s if math.isfinite(s) else -math.inf for s in scores]
    order = sorted(range(len(scores)), key=lambda j: (-worst[j], bool(positive[j])))
    return 1 + next(i for i, j in enumerate(order) if positive[j])


def with_nonfinite(rng, shape, fraction=0.3):
    scores = rng.integers(0, 4, size=shape).astype(np.float32)  # many ties
    mask = rng.random(shape) < fraction
    scores[mask] = rng.choice(np.array([NAN, INF, -INF], np.float32), size=int(mask.sum()))
    return scores


def test_positive_and_class_ranks_match_brute_force_with_nan_and_inf():
    rng = np.random.default_rng(0)
    for _ in range(40):
        q, c = rng.integers(1, 8), rng.integers(2, 12)
        scores = with_nonfinite(rng, (q, c))
        positive = rng.random((q, c)) < 0.3
        positive[np.arange(q), rng.integers(0, c, size=q)] = True
        ranks = positive_ranks(torch.from_numpy(scores), torch.from_numpy(positive))
        assert ranks.tolist() == [brute_rank(scores[i], positive[i]) for i in range(q)]
        labels = rng.integers(0, c, size=q)
        cranks = class_ranks(torch.from_numpy(scores), torch.from_numpy(labels))
        assert cranks.tolist() == [brute_rank(scores[i], np.arange(c) == labels[i])
                                   for i in range(q)]
        preds = pessimistic_predictions(torch.from_numpy(scores), torch.from_numpy(labels))
        assert ((preds.numpy() == labels) == (cranks.numpy() == 1)).all()


def test_all_nan_scores_are_total_misses():
    nan = torch.full((5, 5), NAN)
    assert recall_at_k(nan, torch.eye(5, dtype=torch.bool), ks=(1, 4, 5)) == {
        "R@1": 0.0, "R@4": 0.0, "R@5": 100.0}              # only K = every candidate reaches
    labels = torch.arange(5)
    assert class_ranks(nan, labels).tolist() == [5] * 5    # the rank of a total miss
    assert not (pessimistic_predictions(nan, labels) == labels).any()
    metrics = zeroshot_metrics(class_ranks(nan, labels), labels, list("abcde"), ks=(1, 4))
    assert metrics["top1"] == 0.0 and metrics["top4"] == 0.0
    # one NaN positive among finite negatives ranks below all of them; +inf is no better
    assert positive_ranks(torch.tensor([[NAN, 0.1, -5.0], [INF, 0.1, -5.0]]),
                          torch.tensor([[True, False, False]] * 2)).tolist() == [3, 3]
    # a NaN negative does not push a finite positive down
    assert positive_ranks(torch.tensor([[NAN, 0.1, INF]]),
                          torch.tensor([[False, True, False]])).tolist() == [1]


def test_nan_encodings_score_zero_and_are_counted():
    enc_a = torch.full((6, 4), NAN)
    enc_b = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    forward, backward = encoded_ranks(enc_a, enc_b, np.arange(6), np.arange(6), chunk=4)
    assert forward.tolist() == [6] * 6 and backward.tolist() == [6] * 6
    links = Links.from_rows(np.arange(6), np.arange(6))
    assert chunked_ranks(lambda s, e: torch.full((e - s, 6), NAN), links, 4).tolist() == [6] * 6
    enc_b[2, 1] = INF
    assert nonfinite_rows(enc_a) == 6 and nonfinite_rows(enc_b) == 1
    assert nonfinite_rows(torch.zeros(0, 4)) == 0
    from alignpipe.methods.space import SparseRows

    sparse = SparseRows.from_topk(torch.tensor([[0, 1], [1, 2], [0, 2]]),
                                  torch.tensor([[1.0, NAN], [0.5, 0.5], [INF, 1.0]]), 3)
    assert nonfinite_rows(sparse) == 2
