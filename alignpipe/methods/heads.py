"""Heads: plain nn.Modules that map one side's cached latents into the shared space."""

from __future__ import annotations

from torch import nn


class ResidualBlock(nn.Module):
    """``x + Linear(e·d→d)(Dropout(GELU(Linear(d→e·d)(LayerNorm(x)))))``: FuseMix's pre-LN block."""

    def __init__(self, dim: int, expansion: float = 4, dropout: float = 0.0):
        super().__init__()
        hidden = int(expansion * dim)
        self.ln = nn.LayerNorm(dim)
        self.fn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.fn(self.ln(x))


def mlp_head(dim_in: int, out_dim: int, blocks: int = 4, expansion: float = 4,
             dropout: float = 0.6) -> nn.Sequential:
    """`blocks` residual blocks at the input width, then LayerNorm and a projection."""
    layers: list[nn.Module] = [ResidualBlock(dim_in, expansion, dropout) for _ in range(blocks)]
    layers += [nn.LayerNorm(dim_in), nn.Linear(dim_in, out_dim)]
    return nn.Sequential(*layers)


def linear_head(dim_in: int, out_dim: int, bias: bool = True) -> nn.Module:
    return nn.Linear(dim_in, out_dim, bias=bias)


def matmul_flops_per_row(head: nn.Module) -> int:
    """Forward FLOPs per input row of the head's Linear layers (2·in·out each).

    LayerNorm, GELU and dropout are a few FLOPs per element and left out, as MFU counts usually
    do; backward costs twice the forward.
    """
    return sum(2 * m.in_features * m.out_features for m in head.modules()
               if isinstance(m, nn.Linear))
