"""`mlp`: residual MLP projectors per side, as in the FuseMix and freeze-align code."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from alignpipe.methods.contrastive import ContrastiveConfig, HeadsMethod, loss_from
from alignpipe.methods.heads import mlp_head
from alignpipe.methods.params import MAX_BLOCKS, MAX_DIM, MAX_EXPANSION, param
from alignpipe.methods.registry import register_method


@dataclass
class MLPHeadsConfig:
    """The shape of one residual MLP head (FuseMix's names in the help)."""

    out_dim: int = param(512, low=1, high=MAX_DIM, help="shared width (FuseMix proj_embed_dim)")
    blocks: int = param(4, low=0, high=MAX_BLOCKS, help="residual blocks (num_layers_vis)")
    expansion: int = param(4, low=0, low_open=True, high=MAX_EXPANSION,
                           help="hidden width / input width (expansion_factor)")
    dropout: float = param(0.6, low=0, high=1, high_open=True, help="inside each block")


@dataclass
class MLPConfig(ContrastiveConfig, MLPHeadsConfig):
    """`mlp`'s keys: the heads' first, then the loss's (bases' fields come last base first)."""


def mlp_heads(config: dict, dim_a: int, dim_b: int) -> tuple[nn.Sequential, nn.Sequential]:
    """One residual MLP head per side, shaped by the config's head keys."""
    def one(dim: int) -> nn.Sequential:
        return mlp_head(dim, int(config["out_dim"]), int(config["blocks"]),
                        float(config["expansion"]), float(config["dropout"]))

    return one(dim_a), one(dim_b)


@register_method("mlp", config=MLPConfig,
                 description="residual MLP heads per side, plain InfoNCE (freeze-align, APE)")
def build_mlp(config: dict, dim_a: int, dim_b: int) -> HeadsMethod:
    """Residual MLP heads and the configured loss."""
    head_a, head_b = mlp_heads(config, dim_a, dim_b)
    return HeadsMethod("mlp", config, head_a, head_b, loss_from(config))
