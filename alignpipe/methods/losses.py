"""Contrastive losses, registered by name: symmetric InfoNCE with a learnable, clamped
temperature (as in the FuseMix code) today.

A loss is a class registered with ``@register_loss(name, config=MyLossConfig)``; a trained method
builds the one its config's ``loss`` key names (``build_loss(config)``). It holds its learnable
state as one ``nn.Module`` (``state``: saved with the heads under ``loss.*``), maps one batch of
paired encodings to a scalar (``__call__(za, zb)``), keeps its state in range after each
optimiser step (``after_step``) and says what to log per epoch (``log_values``). Its config
dataclass (params.py) declares the keys it reads, so ``fit --set`` checks them like the method's
own once the loss is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from alignpipe.methods.params import config_defaults, config_schema, param
from alignpipe.util.registry import Registry


class Temperature(nn.Module):
    """The softmax temperature as a parameter, clamped in place into [low, high].

    FuseMix keeps the temperature itself (not CLIP's log logit scale) as the parameter and clamps
    it before every forward; we clamp after every optimiser step and at construction, which
    gives the same values in every forward pass.
    """

    def __init__(self, init: float = 0.07, low: float = 0.001, high: float = 0.5,
                 learnable: bool = True) -> None:
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


# ---- the loss registry --------------------------------------------------------------------------
class Loss(Protocol):
    """One batch of paired encodings (row i of each is a positive pair) in, a scalar out."""

    state: nn.Module  # learnable parameters and buffers, saved with the heads as ``loss.*``

    def __call__(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor: ...

    def after_step(self) -> None: ...

    def log_values(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class LossSpec:
    """How to build a loss from a method's resolved config, and the config dataclass of the keys
    it reads (params.py)."""

    name: str
    build: Callable[[dict], Loss]
    config: type
    description: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """The loss's config keys with their defaults."""
        return config_defaults(self.config)


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(name: str, *, config: type | None = None, defaults: dict | None = None,
                  description: str = "") -> Callable[[Callable[[dict], Loss]],
                                                     Callable[[dict], Loss]]:
    """Decorator: register ``build(config) -> Loss`` (a class or a function) under `name`.

    `config` is the dataclass of the config keys the loss reads (params.py); `defaults`, a
    mapping of key to default, is shorthand for one whose keys take their default's type.
    """
    schema = config_schema(name, config, defaults)

    def wrap(build: Callable[[dict], Loss]) -> Callable[[dict], Loss]:
        LOSSES.add(name, LossSpec(name, build, schema, description))
        return build

    return wrap


def list_losses(pattern: str = "*") -> list[str]:
    """Registered loss names matching a shell-style wildcard, sorted."""
    return LOSSES.names(pattern)


def loss_spec(name: str) -> LossSpec:
    return LOSSES.get(name)


def build_loss(config: dict) -> Loss:
    """The loss the config's ``loss`` key names (infonce when absent), built from its keys."""
    spec = loss_spec(config.get("loss", DEFAULT_LOSS))
    return spec.build({**spec.defaults, **config})


DEFAULT_LOSS = "infonce"


@dataclass
class InfoNCEConfig:
    """The keys of `InfoNCE`: the temperature's start and clamp (FuseMix: 0.07 in
    [0.001, 0.5])."""

    temperature: float = param(0.07, low=0, low_open=True, help="initial value (FuseMix, CLIP)")
    temperature_min: float = param(0.001, low=0, low_open=True, help="clamped from below to this")
    temperature_max: float = param(0.5, low=0, low_open=True, help="clamped from above to this")
    learn_temperature: bool = param(True, help="false keeps the temperature fixed")


@register_loss("infonce", config=InfoNCEConfig,
               description="symmetric InfoNCE, learnable temperature clamped after each step")
class InfoNCE:
    """`symmetric_infonce` at a `Temperature` (the state, saved as ``loss.temperature``)."""

    def __init__(self, config: dict) -> None:
        self.state = Temperature(config["temperature"], config["temperature_min"],
                                 config["temperature_max"],
                                 learnable=bool(config["learn_temperature"]))

    def __call__(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return symmetric_infonce(za, zb, self.state())

    def after_step(self) -> None:
        self.state.clamp_()

    def log_values(self) -> dict[str, float]:
        return {"temperature": float(self.state().detach())}
