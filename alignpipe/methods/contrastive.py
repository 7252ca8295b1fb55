"""Trained methods: two heads and a registered loss, plus an optional batch transform.

`linear`, `mlp` and `fusemix` are all a `HeadsMethod`; they differ only in the heads they are
given and whether a `BatchTransform` (FuseMix's latent mixup) sits in front of them. The loss is
the one the config's ``loss`` key names (losses.py). The training loop lives in fit/loop.py, is
handed to `fit`, and uses only the `TrainedMethod` protocol (base.py), which this class keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignpipe.methods.base import Loop, Pairs, check_side
from alignpipe.methods.heads import Standardize, input_dim, matmul_flops_per_row
from alignpipe.methods.losses import DEFAULT_LOSS, InfoNCEConfig, Loss, build_loss
from alignpipe.methods.params import param

ENCODE_CHUNK = 16384


class BatchTransform(Protocol):
    """Turns one block of raw latents into the batches the loss is computed on."""

    rows_per_pair: int
    batch_multiples: tuple[int, ...]  # sizes of the yielded batches, in units of the batch

    def __call__(self, xa: torch.Tensor, xb: torch.Tensor,
                 rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


def loss_from(config: dict) -> Loss:
    """The loss named by the config's ``loss`` key (infonce by default)."""
    return build_loss(config)


class HeadsMethod:
    """Two heads, a loss and an optional batch transform: every trained built-in method."""

    trained = True

    def __init__(self, name: str, config: dict, head_a: nn.Module, head_b: nn.Module,
                 loss: Loss, transform: BatchTransform | None = None) -> None:
        self.name = name
        self.config = config
        self.loss = loss
        # The loss's learnable state (infonce: the temperature) is saved as ``loss.*``.
        self.model = nn.ModuleDict({"a": head_a, "b": head_b, "loss": loss.state})
        if config.get("standardize"):
            for side, head in (("a", head_a), ("b", head_b)):
                dim = input_dim(head)
                if dim is not None:  # an identity side stays exactly as it is
                    self.model[f"norm_{side}"] = Standardize(dim)
        self.transform = transform

    def _inputs(self, side: str, latents: torch.Tensor) -> torch.Tensor:
        norm = f"norm_{side}"
        return self.model[norm](latents) if norm in self.model else latents

    # ---- training ------------------------------------------------------------------------------
    @property
    def rows_per_pair(self) -> int:
        """Dataset rows one loss pair consumes (FuseMix mixes two rows into one pair)."""
        return self.transform.rows_per_pair if self.transform else 1

    def fit(self, train: Pairs, val: Pairs, loop: Loop | None = None) -> None:
        if loop is None:
            raise ValueError(f"method {self.name} is trained: pass fit.py's loop")
        for side in ("a", "b"):
            if f"norm_{side}" in self.model:  # statistics of the training rows only
                self.model[f"norm_{side}"].fit(getattr(train, side))
        loop(self, train, val)

    def training_loss(self, xa: torch.Tensor, xb: torch.Tensor,
                      rng: np.random.Generator) -> torch.Tensor:
        """Loss of one step's block of raw latents (its rows = batch × rows_per_pair)."""
        xa, xb = xa.float(), xb.float()
        batches = self.transform(xa, xb, rng) if self.transform else [(xa, xb)]
        losses = [self.loss(self.model["a"](self._inputs("a", a)),
                            self.model["b"](self._inputs("b", b)))
                  for a, b in batches]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def after_step(self) -> None:
        self.loss.after_step()

    def log_values(self) -> dict[str, float]:
        """Per-epoch values for metrics.jsonl besides the loss (infonce: the temperature)."""
        return self.loss.log_values()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything trained, named as in `state_tensors`."""
        return self.model.named_parameters()

    def train(self, mode: bool = True) -> HeadsMethod:
        """Training mode (dropout on) or eval mode for every module."""
        self.model.train(mode)
        return self

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Decay weight matrices only; biases, LayerNorms and the temperature are left alone."""
        decay, keep = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else keep).append(parameter)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": keep, "weight_decay": 0.0}]

    def step_flops(self, batch: int) -> int:
        """Model FLOPs of one training step of `batch` loss pairs: heads fwd+bwd and the loss.

        Backward is counted as twice the forward; the loss is the batch × batch × out_dim logits
        matmul (forward, and two matmuls backward).
        """
        multiples = self.transform.batch_multiples if self.transform else (1,)
        per_row = matmul_flops_per_row(self.model["a"]) + matmul_flops_per_row(self.model["b"])
        heads = 3 * batch * sum(multiples) * per_row
        loss = sum(3 * 2 * (m * batch) ** 2 * self.out_dim for m in multiples)
        return heads + loss

    def step_bytes(self, batch: int) -> int:
        """Rough activation memory of one step: saved Linear inputs/outputs plus the logits."""
        multiples = self.transform.batch_multiples if self.transform else (1,)
        per_row = sum(m.in_features + 2 * m.out_features
                      for side in ("a", "b") for m in self.model[side].modules()
                      if isinstance(m, nn.Linear))
        rows = batch * sum(multiples) + batch * self.rows_per_pair
        return 4 * (rows * per_row + sum(6 * (m * batch) ** 2 for m in multiples))

    @property
    def out_dim(self) -> int:
        for side in ("a", "b"):
            last = [m for m in self.model[side].modules() if isinstance(m, nn.Linear)]
            if last:
                return last[-1].out_features
        return 0

    # ---- use ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, side: str, latents: torch.Tensor) -> torch.Tensor:
        check_side(side)
        head = self.model[side]
        was_training = head.training
        head.eval()
        out = [F.normalize(head(self._inputs(side, latents[i:i + ENCODE_CHUNK].float())), dim=-1)
               for i in range(0, latents.shape[0], ENCODE_CHUNK)]
        head.train(was_training)
        if not out:
            return torch.zeros(0, self.out_dim, device=latents.device)
        return torch.cat(out)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)

    def to(self, device: torch.device) -> HeadsMethod:
        self.model.to(device)
        return self


@dataclass
class LossChoice:
    """The ``loss`` key: a registered loss (losses.py), whose own keys come with it."""

    loss: str = param(DEFAULT_LOSS, help="a registered loss; its own config keys come with it")


@dataclass
class ContrastiveConfig(InfoNCEConfig, LossChoice):
    """The keys every `HeadsMethod` reads: loss, infonce's temperature keys (FuseMix: 0.07,
    clamped into [0.001, 0.5]) and standardize, in that order (a dataclass lists the fields of
    its bases last base first, then its own)."""

    # Standardise each latent feature with train-split statistics before the heads (off in
    # the papers' code); helps encoders whose latents sit in a narrow cone.
    standardize: bool = param(False, help="standardise each latent feature before the heads")
