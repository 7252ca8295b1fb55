"""What every method sees and offers: paired latents in, encodings out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from alignpipe.methods.space import Encoded

SIDES = ("a", "b")


@dataclass
class Pairs:
    """Row-aligned latents of two stores, already on the device.

    Row j of `a` and row j of `b` are manifest row ``rows[j]``. `items_a`/`items_b` number the
    media items of each side (rows sharing an image path share an item), so retrieval can
    count "any caption of this image" as a hit.
    """

    a: torch.Tensor
    b: torch.Tensor
    rows: np.ndarray
    items_a: np.ndarray
    items_b: np.ndarray

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def side(self, side: str) -> torch.Tensor:
        return self.a if side == "a" else self.b


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
