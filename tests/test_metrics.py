"""Pure metric functions against brute-force references, ties and multi-caption groups included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignpipe.evaluate.metrics import (
    Links,
    chunked_ranks,
    class_ranks,
    confusion_matrix,
    encoded_ranks,
    pessimistic_predictions,
    positive_ranks,
    recall_at_k,
    recall_curve,
    recalls_from_ranks,
    zeroshot_metrics,
)


def brute_rank(scores: np.ndarray, positive: np.ndarray) -> int:
    """Sort candidates by score, negatives first among equals; rank of the first positive."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], bool(positive[j])))
    return 1 + next(i for i, j in enumerate(order) if positive[j])


def test_positive_ranks_match_brute_force_with_ties_and_groups():
    rng = np.random.default_rng(0)
    for _ in range(30):
        q, c = rng.integers(1, 9), rng.integers(2, 15)
        scores = rng.integers(0, 4, size=(q, c)).astype(np.float32)  # many ties
        positive = rng.random((q, c)) < 0.3
        positive[np.arange(q), rng.integers(0, c, size=q)] = True  # ≥ 1 positive per query
        ranks = positive_ranks(torch.from_numpy(scores), torch.from_numpy(positive))
        expected = [brute_rank(scores[i], positive[i]) for i in range(q)]
        assert ranks.tolist() == expected


def test_ties_count_against_the_query():
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    positive = torch.tensor([[False, True, False]])
    assert positive_ranks(scores, positive).tolist() == [2]
    # a constant scorer gets no credit for row order
    flat = torch.zeros(4, 4)
    assert recall_at_k(flat, torch.eye(4, dtype=torch.bool), ks=(1, 3, 4)) == {
        "R@1": 0.0, "R@3": 0.0, "R@4": 100.0}
    # ties among positives do not hurt
    assert positive_ranks(torch.tensor([[2.0, 2.0, 1.0]]),
                          torch.tensor([[True, True, False]])).tolist() == [1]


def test_analytic_recalls():
    assert recall_at_k(torch.eye(5), torch.eye(5, dtype=torch.bool)) == {
        "R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    # reversed order: the positive of query i ranks i+1
    scores = -torch.eye(4)
    assert positive_ranks(scores, torch.eye(4, dtype=torch.bool)).tolist() == [4, 4, 4, 4]
    assert recalls_from_ranks(torch.tensor([1, 2, 6, 11]), ks=(1, 5, 10)) == {
        "R@1": 25.0, "R@5": 50.0, "R@10": 75.0}


def test_every_query_needs_a_positive():
    with pytest.raises(ValueError, match="at least one positive"):
        positive_ranks(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_multi_caption_groups_against_brute_force():
    """Image→text hits when any caption of the image ranks within K; text→image ranks images."""
    rng = np.random.default_rng(1)
    captions_of = [rng.integers(1, 5) for _ in range(12)]            # 12 images
    image_of_caption = np.repeat(np.arange(12), captions_of)         # one row per caption
    img = torch.nn.functional.normalize(torch.randn(12, 6), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(len(image_of_caption), 6), dim=1)
    sims = (img @ txt.T).numpy()
    forward, backward = encoded_ranks(img, txt, image_of_caption,
                                      np.arange(len(image_of_caption)), chunk=5)
    for i in range(12):
        own = image_of_caption == i
        best = sims[i, own].max()
        assert forward[i] == 1 + int((sims[i, ~own] >= best).sum())
    for t, i in enumerate(image_of_caption):
        others = np.delete(sims[:, t], i)
        assert backward[t] == 1 + int((others >= sims[i, t]).sum())


def test_chunking_does_not_change_ranks():
    rng = np.random.default_rng(2)
    q_items = rng.integers(0, 20, size=60)
    c_items = np.arange(60)
    links = Links.from_rows(q_items, c_items)
    scores = torch.randn(links.n_query, links.n_candidate)

    def score_rows(s, e):
        return scores[s:e]

    assert torch.equal(chunked_ranks(score_rows, links, chunk=3),
                       chunked_ranks(score_rows, links, chunk=1000))


def test_recall_curve_matches_recalls():
    ranks = torch.tensor([1, 1, 3, 7, 50, 200])
    curve = recall_curve(ranks, 100)
    assert curve[0] == pytest.approx(recalls_from_ranks(ranks, (1,))["R@1"])
    assert curve[4] == pytest.approx(recalls_from_ranks(ranks, (5,))["R@5"])
    assert curve[-1] == pytest.approx(100 * 5 / 6)


def test_zeroshot_ranks_predictions_and_per_class():
    scores = torch.tensor([[0.9, 0.1, 0.0],    # class 0, right
                           [0.5, 0.5, 0.0],    # class 1, tied with 0: pessimistic miss
                           [0.2, 0.7, 0.5],    # class 2, rank 2
                           [0.0, 0.0, 1.0]])   # class 2, right
    labels = torch.tensor([0, 1, 2, 2])
    ranks = class_ranks(scores, labels)
    assert ranks.tolist() == [1, 2, 2, 1]
    preds = pessimistic_predictions(scores, labels)
    assert preds.tolist() == [0, 0, 1, 2]
    assert ((preds == labels) == (ranks == 1)).all()
    metrics = zeroshot_metrics(ranks, labels, ["a", "b", "c"], ks=(1, 2))
    assert metrics["top1"] == 50.0 and metrics["top2"] == 100.0
    assert metrics["per_class_accuracy"] == {"a": 100.0, "b": 0.0, "c": 50.0}
    assert confusion_matrix(preds, labels, 3).tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]


def test_zeroshot_ranks_brute_force():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=40)
    ranks = class_ranks(torch.from_numpy(scores), torch.from_numpy(labels))
    for i in range(40):
        onehot = np.arange(6) == labels[i]
        assert ranks[i] == brute_rank(scores[i], onehot)
