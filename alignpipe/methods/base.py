"""What every method sees and offers: paired latents in, encodings out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from alignpipe.data.pairs import Pairs  # defined below the methods; importable from here too
from alignpipe.methods.space import Encoded

SIDES = ("a", "b")


# The training loop fit.py passes to trained methods: loop(method, train, val) -> None.
Loop = Callable[["Method", Pairs, Pairs], None]


class Method(Protocol):
    """A fitted or fittable alignment between side a and side b."""

    name: str
    trained: bool
    config: dict

    def fit(self, train: Pairs, val: Pairs, loop: Loop | None = None) -> None: ...

    def encode(self, side: str, latents: torch.Tensor) -> Encoded: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def to(self, device: torch.device) -> Method: ...


class TrainedMethod(Method, Protocol):
    """What the training loop (fit/loop.py) uses of a trained method, and nothing more.

    A method with another loss, other heads or another batch transform implements these and
    needs no change to the loop. Names in `named_parameters` are those of `state_tensors`; they
    key the optimiser state in checkpoints.
    """

    rows_per_pair: int  # dataset rows one loss pair consumes (FuseMix mixes two into one)

    def training_loss(self, xa: torch.Tensor, xb: torch.Tensor,
                      rng: np.random.Generator) -> torch.Tensor:
        """The loss of one step's block of raw latents (batch × rows_per_pair rows each)."""
        ...

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups (which parameters decay)."""
        ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def train(self, mode: bool = True) -> TrainedMethod:
        """Training mode (dropout on) before each epoch's steps."""
        ...

    def after_step(self) -> None:
        """After each optimiser step (infonce: clamp the temperature)."""
        ...

    def log_values(self) -> dict[str, float]:
        """Values logged per epoch beside the loss (infonce: the temperature)."""
        ...

    def step_flops(self, batch: int) -> int:
        """Model FLOPs of one step of `batch` loss pairs (the benchmark's utilisation)."""
        ...

    def step_bytes(self, batch: int) -> int:
        """Rough activation memory of one step, to shrink a batch that would not fit."""
        ...


def check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
