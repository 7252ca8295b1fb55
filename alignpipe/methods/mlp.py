"""`mlp`: residual MLP projectors per side, as in the FuseMix and freeze-align code."""

from __future__ import annotations

from alignpipe.methods.contrastive import LOSS_DEFAULTS, HeadsMethod, loss_from
from alignpipe.methods.heads import mlp_head
from alignpipe.methods.registry import register_method

MLP_DEFAULTS = {
    "out_dim": 512,      # FuseMix proj_embed_dim
    "blocks": 4,         # num_layers_vis / num_layers_text
    "expansion": 4,      # expansion_factor
    "dropout": 0.6,
    **LOSS_DEFAULTS,
}


def mlp_heads(config: dict, dim_a: int, dim_b: int):
    def one(dim):
        return mlp_head(dim, int(config["out_dim"]), int(config["blocks"]),
                        float(config["expansion"]), float(config["dropout"]))

    return one(dim_a), one(dim_b)


@register_method("mlp", defaults=MLP_DEFAULTS,
                 description="residual MLP heads per side, plain InfoNCE (freeze-align, APE)")
def build_mlp(config: dict, dim_a: int, dim_b: int) -> HeadsMethod:
    head_a, head_b = mlp_heads(config, dim_a, dim_b)
    return HeadsMethod("mlp", config, head_a, head_b, loss_from(config))
