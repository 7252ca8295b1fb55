"""Heads: plain nn.Modules that map one side's cached latents into the shared space."""

from __future__ import annotations

import torch
from torch import nn

STATS_CHUNK = 65536
MAX_HEAD_PARAMETERS = 1_000_000_000  # refuse before allocating: a typo must not hang or OOM


def check_head_size(parameters: int, what: str) -> None:
    """Refuse (ValueError) a head of more than `MAX_HEAD_PARAMETERS` parameters."""
    if parameters > MAX_HEAD_PARAMETERS:
        raise ValueError(f"{what} would have {parameters:,} parameters, more than the "
                         f"{MAX_HEAD_PARAMETERS:,} alignpipe builds; check blocks, expansion "
                         f"and out_dim")


class ResidualBlock(nn.Module):
    """``x + Linear(e·d→d)(Dropout(GELU(Linear(d→e·d)(LayerNorm(x)))))``: FuseMix's pre-LN block."""

    def __init__(self, dim: int, expansion: float = 4, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(expansion * dim)
        self.ln = nn.LayerNorm(dim)
        self.fn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


def mlp_head(dim_in: int, out_dim: int, blocks: int = 4, expansion: float = 4,
             dropout: float = 0.6) -> nn.Sequential:
    """`blocks` residual blocks at the input width, then LayerNorm and a projection."""
    hidden = int(expansion * dim_in)
    check_head_size(blocks * 2 * dim_in * hidden + dim_in * out_dim, "an mlp head")
    layers: list[nn.Module] = [ResidualBlock(dim_in, expansion, dropout) for _ in range(blocks)]
    layers += [nn.LayerNorm(dim_in), nn.Linear(dim_in, out_dim)]
    return nn.Sequential(*layers)


class Standardize(nn.Module):
    """Per-feature ``(x - mean) / std`` with statistics of the training latents, kept as buffers.

    Frozen encoders often put every latent in a narrow cone (a large shared offset, a small
    spread); the heads' per-row LayerNorm cannot remove an offset shared by all rows, so such
    inputs look alike to the heads. This layer removes it. It is affine, so FuseMix's mixing of
    raw latents commutes with it.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, latents: torch.Tensor) -> None:
        """Set mean and std from `latents` (rows × dim), in chunks and in float64."""
        total = torch.zeros(latents.shape[1], dtype=torch.float64, device=latents.device)
        squares = torch.zeros_like(total)
        for start in range(0, latents.shape[0], STATS_CHUNK):
            chunk = latents[start:start + STATS_CHUNK].double()
            total += chunk.sum(0)
            squares += (chunk * chunk).sum(0)
        n = max(1, latents.shape[0])
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0)
        self.mean.copy_(mean.to(self.mean))
        self.inv_std.copy_((var.sqrt() + self.eps).reciprocal().to(self.inv_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def input_dim(head: nn.Module) -> int | None:
    """Width of the latents a head reads (None for an identity head)."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[0])
    return None


def linear_head(dim_in: int, out_dim: int, bias: bool = True) -> nn.Module:
    """One linear map, its size checked first."""
    check_head_size(dim_in * out_dim, "a linear head")
    return nn.Linear(dim_in, out_dim, bias=bias)


def matmul_flops_per_row(head: nn.Module) -> int:
    """Forward FLOPs per input row of the head's Linear layers (2·in·out each).

    LayerNorm, GELU and dropout are a few FLOPs per element and left out, as MFU counts usually
    do; backward costs twice the forward.
    """
    return sum(2 * m.in_features * m.out_features for m in head.modules()
               if isinstance(m, nn.Linear))
