"""Trained methods: two heads and a contrastive loss, plus an optional batch transform.

`linear`, `mlp` and `fusemix` are all a `HeadsMethod`; they differ only in the heads they are
given and whether a `BatchTransform` (FuseMix's latent mixup) sits in front of them. The
training loop itself lives in fit.py and is handed to `fit`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignpipe.methods.base import Loop, Pairs, check_side
from alignpipe.methods.heads import Standardize, input_dim, matmul_flops_per_row
from alignpipe.methods.losses import Temperature, symmetric_infonce

ENCODE_CHUNK = 16384


class BatchTransform(Protocol):
    """Turns one block of raw latents into the batches the loss is computed on."""

    rows_per_pair: int
    batch_multiples: tuple[int, ...]  # sizes of the yielded batches, in units of the batch

    def __call__(self, xa: torch.Tensor, xb: torch.Tensor,
                 rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


def temperature_from(config: dict) -> Temperature:
    return Temperature(config["temperature"], config["temperature_min"],
                       config["temperature_max"], learnable=bool(config["learn_temperature"]))


class HeadsMethod:
    trained = True

    def __init__(self, name: str, config: dict, head_a: nn.Module, head_b: nn.Module,
                 temperature: Temperature, transform: BatchTransform | None = None):
        self.name = name
        self.config = config
        self.model = nn.ModuleDict({"a": head_a, "b": head_b, "loss": temperature})
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
        t = self.model["loss"]()
        losses = [symmetric_infonce(self.model["a"](self._inputs("a", a)),
                                    self.model["b"](self._inputs("b", b)), t)
                  for a, b in batches]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def after_step(self) -> None:
        self.model["loss"].clamp_()

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Decay weight matrices only; biases, LayerNorms and the temperature are left alone."""
        decay, keep = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else keep).append(param)
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


# Config keys every trained method understands (the loop's own keys live in fit.py).
LOSS_DEFAULTS = {
    "temperature": 0.07,        # FuseMix / CLIP initial value
    "temperature_min": 0.001,   # FuseMix clamps the temperature into [0.001, 0.5]
    "temperature_max": 0.5,
    "learn_temperature": True,
    # Standardise each latent feature with train-split statistics before the heads (off in
    # the papers' code); helps encoders whose latents sit in a narrow cone.
    "standardize": False,
}
