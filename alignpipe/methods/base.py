"""What every method sees and offers: paired latents in, encodings out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from alignpipe.methods.space import Encoded
from alignpipe.pairs import Pairs  # defined below the methods; importable from here too

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


def check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
