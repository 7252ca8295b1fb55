"""`fusemix`: the mlp heads trained with FuseMix latent mixup (Vouitsis et al., CVPR 2024).

As in the paper's code (``MLPContrastiveFusion.forward``): a step takes a shuffled block of 2B
pairs, draws one λ ~ Beta(α, α), and mixes row k with row k+B, with the same λ and the same
partner for both modalities, on the raw cached latents before the heads; the loss sees the B
mixed pairs. ``keep_unmixed`` adds the InfoNCE of the 2B clean pairs and averages the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignpipe.methods.contrastive import HeadsMethod, loss_from
from alignpipe.methods.mlp import MLPConfig, mlp_heads
from alignpipe.methods.params import param
from alignpipe.methods.registry import register_method


@dataclass
class FuseMixConfig(MLPConfig):
    """`mlp`'s keys, then the mixup's."""

    alpha: float = param(1.0, low=0, low_open=True, help="λ ~ Beta(alpha, alpha)")
    keep_unmixed: bool = param(False, help="also the loss of the 2B clean pairs, averaged")


class FuseMix:
    """The batch transform: 2B raw pairs in, B mixed pairs (and optionally the 2B clean) out."""

    rows_per_pair = 2

    def __init__(self, alpha: float = 1.0, keep_unmixed: bool = False) -> None:
        if alpha <= 0:
            raise ValueError(f"fusemix alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.keep_unmixed = keep_unmixed
        self.batch_multiples = (1, 2) if keep_unmixed else (1,)

    def __call__(self, xa: torch.Tensor, xb: torch.Tensor,
                 rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        half = xa.shape[0] // 2
        lam = float(rng.beta(self.alpha, self.alpha))
        mixed = (lam * xa[:half] + (1 - lam) * xa[half:2 * half],
                 lam * xb[:half] + (1 - lam) * xb[half:2 * half])
        return [mixed, (xa, xb)] if self.keep_unmixed else [mixed]


@register_method("fusemix", config=FuseMixConfig,
                 description="mlp heads + FuseMix latent mixup, λ~Beta(α,α) shared by both sides")
def build_fusemix(config: dict, dim_a: int, dim_b: int) -> HeadsMethod:
    """The mlp heads and loss behind a `FuseMix` batch transform."""
    head_a, head_b = mlp_heads(config, dim_a, dim_b)
    mix = FuseMix(float(config["alpha"]), bool(config["keep_unmixed"]))
    return HeadsMethod("fusemix", config, head_a, head_b, loss_from(config), mix)
