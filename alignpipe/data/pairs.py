"""`Pairs`: row-aligned latents of two stores on the device, what stage two trains and scores on.

It lives below both `latents` (which builds it from stores) and `methods` (which consume it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
