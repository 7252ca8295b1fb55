"""The streaming per-concept top-N, the union over concepts, balancing and near-duplicates.

A `TopN` holds, per concept, the best `n` (score, row) pairs seen so far, ordered by score
descending then row ascending. Merging two is the top-`n` of their union under that total order,
so any merge tree (one process folding shards in order, or dask reducing them pairwise) gives the
same result. Memory is concepts × n, never pool × concepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from alignpipe.data.store import LatentStore

NO_SCORE = float("-inf")
# Pool rows scored against every concept in one matmul (bounds the concepts × rows matrix).
SCORE_ROWS = 8192


@dataclass
class TopN:
    scores: np.ndarray  # concepts × k float32, -inf where fewer than k rows qualified
    rows: np.ndarray    # concepts × k int64, -1 where empty

    @classmethod
    def empty(cls, concepts: int) -> TopN:
        return cls(np.zeros((concepts, 0), np.float32), np.zeros((concepts, 0), np.int64))


def _canonical(scores: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Top `n` per concept by (score desc, row asc); empty slots (row -1) sort last."""
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(torch.where(rows < 0, big, rows), dim=1, stable=True)
    scores, rows = scores.gather(1, order), rows.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :n]
    return scores.gather(1, order), rows.gather(1, order)


def merge(a: TopN, b: TopN, n: int) -> TopN:
    """Top-`n` of the union of two partial results (associative and commutative)."""
    scores = torch.from_numpy(np.concatenate([a.scores, b.scores], axis=1))
    rows = torch.from_numpy(np.concatenate([a.rows, b.rows], axis=1))
    s, r = _canonical(scores, rows, n)
    return TopN(s.numpy(), r.numpy())


def tree_merge(parts: list[TopN], n: int, concepts: int) -> TopN:
    """Pairwise reduction of partial results (what the dask job does, in one process)."""
    if not parts:
        return TopN.empty(concepts)
    while len(parts) > 1:
        parts = [merge(parts[i], parts[i + 1], n) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def block_topn(concepts: torch.Tensor, latents: torch.Tensor, first_row: int, valid: np.ndarray,
               n: int, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`n` per concept among one block of pool rows (`latents` already on the device)."""
    x = latents.float()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scores = concepts @ x.T  # concepts × rows
    if threshold is not None:
        scores.masked_fill_(scores < threshold, NO_SCORE)
    if not valid.all():
        scores.masked_fill_(torch.from_numpy(~valid).to(scores.device)[None, :], NO_SCORE)
    k = min(n, scores.shape[1])
    top, where = torch.topk(scores, k, dim=1)
    rows = (where + first_row).to(torch.int64)
    rows = torch.where(torch.isinf(top), torch.full_like(rows, -1), rows)
    return top, rows


def range_topn(store: LatentStore, start: int, stop: int, concepts: np.ndarray,
               valid: np.ndarray, n: int, threshold: float | None,
               device: torch.device) -> TopN:
    """Top-`n` per concept over pool rows [start, stop), read a block of chunks at a time."""
    c = torch.from_numpy(np.ascontiguousarray(concepts, dtype=np.float32)).to(device)
    best_s = torch.zeros((c.shape[0], 0), device=device)
    best_r = torch.zeros((c.shape[0], 0), dtype=torch.int64, device=device)
    chunk = int(store.latents.chunks[0])
    step = max(chunk, (SCORE_ROWS // chunk) * chunk)
    for first in range(start, stop, step):
        last = min(first + step, stop)
        ok = valid[first - start:last - start]  # `valid` covers [start, stop)
        if not ok.any():
            continue
        with store.reading():
            block = torch.from_numpy(np.asarray(store.latents[first:last])).to(device)
        s, r = block_topn(c, block, first, ok, n, threshold)
        best_s, best_r = _canonical(torch.cat([best_s, s], 1), torch.cat([best_r, r], 1), n)
    return TopN(best_s.float().cpu().numpy(), best_r.cpu().numpy())


def union(top: TopN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row once with its best concept: (rows ascending, concept index, score).

    Ties between concepts go to the lower concept index."""
    keep = top.rows >= 0
    concept = np.broadcast_to(np.arange(top.rows.shape[0])[:, None], top.rows.shape)[keep]
    rows, scores = top.rows[keep], top.scores[keep]
    order = np.lexsort((concept, -scores, rows))  # by row, then best score, then concept
    rows, concept, scores = rows[order], concept[order], scores[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return rows[first], concept[first], scores[first]


def balance(rows: np.ndarray, concept: np.ndarray, scores: np.ndarray,
            cap: int) -> np.ndarray:
    """Mask keeping at most `cap` rows per concept after the union (its best-scoring ones)."""
    order = np.lexsort((rows, -scores, concept))
    rank = np.empty(rows.size, dtype=np.int64)
    sorted_concept = concept[order]
    starts = np.r_[0, np.flatnonzero(sorted_concept[1:] != sorted_concept[:-1]) + 1]
    position = np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))
    rank[order] = position
    return rank < cap


def near_duplicates(latents: np.ndarray, scores: np.ndarray, rows: np.ndarray,
                    threshold: float, device: torch.device, block: int = 4096) -> np.ndarray:
    """Mask of rows to keep: greedy in order of score (desc, then row asc), a row is dropped
    when its cosine to a row already kept is above `threshold`."""
    order = np.lexsort((rows, -scores))
    x = torch.from_numpy(np.ascontiguousarray(latents[order], dtype=np.float32)).to(device)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kept_idx: list[torch.Tensor] = []
    keep = np.zeros(rows.size, dtype=bool)
    for first in range(0, rows.size, block):
        b = x[first:first + block]
        alive = torch.ones(b.shape[0], dtype=torch.bool, device=device)
        if kept_idx:
            kept = x[torch.cat(kept_idx)]
            alive &= ~((b @ kept.T) > threshold).any(dim=1)
        within = b @ b.T
        for i in range(b.shape[0]):  # greedy inside the block, in order
            if alive[i]:
                later = within[i, i + 1:] > threshold
                alive[i + 1:] &= ~later
        idx = torch.nonzero(alive).flatten() + first
        kept_idx.append(idx)
        keep[order[idx.cpu().numpy()]] = True
    return keep
