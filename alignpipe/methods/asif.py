"""`asif`: training-free alignment by relative representations (Norelli et al., NeurIPS 2023).

The training pairs are anchors. A query is represented by its cosine similarities to the anchors
of its own modality; only the top-k (default 800) are kept, raised to the power p (default 8)
and the vector L2-normalised. Anchor j of side a and anchor j of side b are the same pair, so
the sparse vectors of both sides live in one space and the cross-modal score is their dot product.

Queries are processed in chunks against blocks of anchors with a running top-k, so memory is
bounded by ``QUERY_CHUNK × ANCHOR_BLOCK`` scores whatever the number of anchors (a million fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from alignpipe.methods.base import Loop, Pairs, check_side
from alignpipe.methods.params import param
from alignpipe.methods.registry import register_method
from alignpipe.methods.space import SparseRows


@dataclass
class AsifConfig:
    """`asif`'s keys (the paper's defaults)."""

    topk: int = param(800, low=1, help="similarities kept per query")
    power: float = param(8.0, low=0, low_open=True, help="the kept similarities' exponent")


QUERY_CHUNK = 1024
ANCHOR_BLOCK = 65536


def relative_topk(queries: torch.Tensor, anchors: torch.Tensor, k: int,
                  anchor_block: int = ANCHOR_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of each query to the anchors: (values, anchor indices).

    Both inputs must be L2-normalised. Anchors are scanned in blocks; each block's top-k is
    merged into the running top-k, so nothing larger than queries × block is ever held.
    """
    k = min(k, anchors.shape[0])
    best_v = torch.full((queries.shape[0], 0), -torch.inf, device=queries.device)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, anchors.shape[0], anchor_block):
        block = anchors[start:start + anchor_block]
        sims = (queries.to(block.dtype) @ block.T).float()
        v, i = sims.topk(min(k, sims.shape[1]), dim=1)
        best_v, order = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]),
                                                        dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    return best_v, best_i


class Asif:
    """Anchors in, sparse relative representations out. Nothing is trained."""

    name = "asif"
    trained = False

    def __init__(self, config: dict, dim_a: int, dim_b: int) -> None:
        self.config = config
        self.topk = int(config["topk"])
        self.power = float(config["power"])
        if self.topk < 1 or self.power <= 0:
            raise ValueError(f"asif needs topk ≥ 1 and power > 0, got {self.topk}, {self.power}")
        self.dims = {"a": dim_a, "b": dim_b}
        self.anchors: dict[str, torch.Tensor] = {}
        self.anchor_rows = np.zeros(0, dtype=np.int64)
        self.warnings: list[str] = []

    def fit(self, train: Pairs, val: Pairs | None = None, loop: Loop | None = None) -> None:
        self.set_anchors(train.a, train.b, train.rows)
        if self.topk > self.n_anchors:
            self.warnings.append(
                f"asif topk {self.topk} is more than the {self.n_anchors} anchor pairs: every "
                f"anchor is kept, so this is topk {self.n_anchors} in effect (no sparsity); "
                f"set topk below {self.n_anchors} or add training rows")

    def set_anchors(self, a: torch.Tensor, b: torch.Tensor, rows: np.ndarray) -> None:
        if a.shape[0] != b.shape[0] or a.shape[0] == 0:
            raise ValueError("asif needs the same, non-zero number of anchors on both sides")
        # Keep the device's storage dtype (fp16 on GPUs): a million anchors stay affordable.
        self.anchors = {"a": F.normalize(a.float(), dim=-1).to(a.dtype),
                        "b": F.normalize(b.float(), dim=-1).to(b.dtype)}
        self.anchor_rows = np.asarray(rows, dtype=np.int64)

    @property
    def n_anchors(self) -> int:
        return int(self.anchors["a"].shape[0]) if self.anchors else 0

    @torch.no_grad()
    def encode(self, side: str, latents: torch.Tensor) -> SparseRows:
        check_side(side)
        if not self.anchors:
            raise RuntimeError("asif has no anchors: call fit (or set_anchors) first")
        anchors = self.anchors[side]
        parts = []
        for start in range(0, latents.shape[0], QUERY_CHUNK):
            queries = F.normalize(latents[start:start + QUERY_CHUNK].float().to(anchors.device),
                                  dim=-1)
            sims, idx = relative_topk(queries, anchors, self.topk)
            # Negative similarities carry no evidence of closeness; an even power would
            # otherwise turn them into positive weight.
            weights = sims.clamp_min(0) ** self.power
            parts.append(SparseRows.from_topk(idx, weights, self.n_anchors).normalized())
        if not parts:
            return SparseRows.from_topk(torch.zeros(0, 1, dtype=torch.long),
                                        torch.zeros(0, 1), self.n_anchors)
        return SparseRows.cat(parts)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Only the anchor row numbers: the latents stay in their stores."""
        return {"anchor_rows": torch.from_numpy(self.anchor_rows)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.anchor_rows = tensors["anchor_rows"].numpy().astype(np.int64)

    def to(self, device: torch.device) -> Asif:
        self.anchors = {k: v.to(device) for k, v in self.anchors.items()}
        return self


@register_method("asif", config=AsifConfig, trained=False,
                 description="training-free: sparse relative representations to anchor pairs")
def build_asif(config: dict, dim_a: int, dim_b: int) -> Asif:
    """The training-free method; its anchors come with `fit`."""
    return Asif(config, dim_a, dim_b)
