"""Encodings and how to compare them, for dense heads and for ASIF's sparse vectors alike.

An encoding is either a dense ``torch.Tensor`` (rows × dim, L2-normalised) or `SparseRows`
(rows × anchors, a few non-zeros per row, L2-normalised). Evaluation only ever calls the
functions here, so it never needs to know which method made the encodings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Largest dense block (elements) a sparse score computation may materialise at once.
DENSE_BUDGET = 1 << 25


@dataclass
class SparseRows:
    """Rows of a sparse matrix in CSR form: row i holds ``values[crow[i]:crow[i+1]]``."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    width: int
    _csr: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_topk(cls, indices: torch.Tensor, values: torch.Tensor, width: int) -> SparseRows:
        n, k = indices.shape
        crow = torch.arange(0, n * k + 1, k, dtype=torch.int64, device=indices.device)
        return cls(crow, indices.reshape(-1).long(), values.reshape(-1).float(), width)

    @classmethod
    def cat(cls, parts: list[SparseRows]) -> SparseRows:
        crows, offset = [torch.zeros(1, dtype=torch.int64, device=parts[0].device)], 0
        for p in parts:
            crows.append(p.crow[1:] - p.crow[0] + offset)
            offset += int(p.crow[-1] - p.crow[0])
        return cls(torch.cat(crows), torch.cat([p.col[p.crow[0]:p.crow[-1]] for p in parts]),
                   torch.cat([p.values[p.crow[0]:p.crow[-1]] for p in parts]), parts[0].width)

    def __len__(self) -> int:
        return int(self.crow.numel() - 1)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def rows(self, start: int, stop: int) -> SparseRows:
        lo, hi = int(self.crow[start]), int(self.crow[stop])
        return SparseRows(self.crow[start:stop + 1] - lo, self.col[lo:hi], self.values[lo:hi],
                          self.width)

    def row_ids(self) -> torch.Tensor:
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(len(self), device=self.device), counts)

    def csr(self) -> torch.Tensor:
        if self._csr is None:
            with warnings.catch_warnings():  # "CSR support is in beta": we use only matmul
                warnings.simplefilter("ignore", UserWarning)
                self._csr = torch.sparse_csr_tensor(self.crow, self.col, self.values,
                                                    size=(len(self), self.width),
                                                    check_invariants=False)
        return self._csr

    def dense(self) -> torch.Tensor:
        out = torch.zeros(len(self), self.width, device=self.device)
        out.index_put_((self.row_ids(), self.col), self.values, accumulate=True)
        return out

    def normalized(self) -> SparseRows:
        norms = torch.zeros(len(self), device=self.device)
        norms.index_add_(0, self.row_ids(), self.values.square())
        scale = norms.sqrt().clamp_min(1e-12)[self.row_ids()]
        return SparseRows(self.crow, self.col, self.values / scale, self.width)

    def group_sum(self, groups: torch.Tensor, n_groups: int) -> SparseRows:
        """Row g of the result is the sum of the rows whose group is g."""
        target = groups.to(self.device)[self.row_ids()]
        with warnings.catch_warnings():  # "CSR support is in beta": we only convert
            warnings.simplefilter("ignore", UserWarning)
            coo = torch.sparse_coo_tensor(torch.stack([target, self.col]), self.values,
                                          size=(n_groups, self.width),
                                          check_invariants=False).coalesce()
            csr = coo.to_sparse_csr()
        return SparseRows(csr.crow_indices(), csr.col_indices(), csr.values(), self.width)


Encoded = torch.Tensor | SparseRows


def num_rows(enc: Encoded) -> int:
    return len(enc) if isinstance(enc, SparseRows) else int(enc.shape[0])


def slice_rows(enc: Encoded, start: int, stop: int) -> Encoded:
    return enc.rows(start, stop) if isinstance(enc, SparseRows) else enc[start:stop]


def pairwise_scores(queries: Encoded, candidates: Encoded) -> torch.Tensor:
    """Dot products, queries × candidates, as a dense float32 tensor."""
    if isinstance(candidates, SparseRows) != isinstance(queries, SparseRows):
        raise TypeError("cannot compare a sparse encoding with a dense one")
    if not isinstance(queries, SparseRows):
        return queries.float() @ candidates.float().T
    # Densify a few query rows at a time: width may be a million anchors.
    step = max(1, DENSE_BUDGET // max(1, queries.width))
    out = []
    for start in range(0, len(queries), step):
        block = queries.rows(start, min(start + step, len(queries))).dense()
        out.append((candidates.csr() @ block.T).T)
    if not out:
        return torch.zeros(0, len(candidates), device=queries.device)
    return torch.cat(out)


def group_mean(enc: Encoded, groups: torch.Tensor, n_groups: int) -> Encoded:
    """Mean of the (normalised) rows of each group, renormalised: CLIP's class embedding."""
    if isinstance(enc, SparseRows):
        return enc.group_sum(groups, n_groups).normalized()
    total = torch.zeros(n_groups, enc.shape[1], device=enc.device, dtype=torch.float32)
    total.index_add_(0, groups.to(enc.device), enc.float())
    return F.normalize(total, dim=-1)
