"""`linear`: one linear map per side into a shared space (APE / LiT style).

``identity_side: a`` (or ``b``) keeps that side as it is, LiT-style "locked" tower, and maps only
the other side into its space; the shared dim is then the kept side's dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from alignpipe.methods.contrastive import ContrastiveConfig, HeadsMethod, loss_from
from alignpipe.methods.heads import linear_head
from alignpipe.methods.params import MAX_DIM, param
from alignpipe.methods.registry import register_method
from alignpipe.util.errors import AlignpipeError


@dataclass
class LinearHeadsConfig:
    """The shape of the linear maps."""

    out_dim: int | None = param(None, low=1, high=MAX_DIM,
                                help="shared width; null: 512, or the kept side's dim")
    identity_side: str | None = param(None, choices=("a", "b"),
                                      help="a side kept as it is (the other maps into it)")
    bias: bool = param(True, help="the maps have a bias")


@dataclass
class LinearConfig(ContrastiveConfig, LinearHeadsConfig):
    """`linear`'s keys: the maps' first, then the loss's (bases' fields come last base first)."""


def _out_dim(config: dict, dims: dict[str, int]) -> int:
    kept = config.get("identity_side")
    if kept not in (None, "a", "b"):
        raise AlignpipeError(f"linear: identity_side must be a, b or null, got {kept!r}")
    wanted = config.get("out_dim")
    if kept is None:
        return int(wanted or 512)
    if wanted not in (None, dims[kept]):
        raise AlignpipeError(
            f"linear: identity_side={kept} keeps side {kept} as it is (dim {dims[kept]}), so "
            f"out_dim must be {dims[kept]} or null, not {wanted}")
    return dims[kept]


@register_method("linear", config=LinearConfig,
                 description="one linear map per side (or identity on one side), InfoNCE")
def build_linear(config: dict, dim_a: int, dim_b: int) -> HeadsMethod:
    """A linear map per side (or the identity on the kept side) and the configured loss."""
    dims = {"a": dim_a, "b": dim_b}
    out = _out_dim(config, dims)
    heads = {side: nn.Identity() if config.get("identity_side") == side
             else linear_head(dims[side], out, bias=bool(config["bias"])) for side in dims}
    return HeadsMethod("linear", config, heads["a"], heads["b"], loss_from(config))
