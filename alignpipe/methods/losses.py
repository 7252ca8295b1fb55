"""Symmetric InfoNCE with a learnable, clamped temperature (as in the FuseMix code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Temperature(nn.Module):
    """The softmax temperature as a parameter, clamped in place into [low, high].

    FuseMix keeps the temperature itself (not CLIP's log logit scale) as the parameter and clamps
    it before every forward; we clamp after every optimiser step and at construction, which
    gives the same values in every forward pass.
    """

    def __init__(self, init: float = 0.07, low: float = 0.001, high: float = 0.5,
                 learnable: bool = True):
        super().__init__()
        if not 0 < low <= init <= high:
            raise ValueError(f"temperature {init} must lie in [{low}, {high}] with low > 0")
        self.low, self.high = low, high
        self.temperature = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.temperature.clamp_(self.low, self.high)

    def forward(self) -> torch.Tensor:
        return self.temperature


def symmetric_infonce(za: torch.Tensor, zb: torch.Tensor,
                      temperature: torch.Tensor) -> torch.Tensor:
    """Mean of a→b and b→a cross-entropy over the in-batch similarity matrix.

    Row i of `za` and row i of `zb` are the positive pair; every other row is a negative.

    The logits and the cross-entropy are always computed in float32, also under bf16 autocast
    (the heads may run in bf16): at the clamped temperature 0.001 logits reach 1000, where
    bf16's step is 4. In float32 this is exactly the papers' computation.
    """
    with torch.autocast(za.device.type, enabled=False):
        za = F.normalize(za.float(), dim=-1)
        zb = F.normalize(zb.float(), dim=-1)
        logits = za @ zb.T / temperature.float()
        target = torch.arange(za.shape[0], device=za.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
