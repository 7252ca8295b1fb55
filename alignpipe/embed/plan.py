"""A work unit reduced to what the encoder must see: unique items, in encoding order.

Within a unit every media item (same resolved path, same text) is decoded and encoded once;
texts are sorted by length so batches pad little; `unit_result` maps latents back to rows in
manifest order and writes a failure record for every row that has no latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from alignpipe.data.manifest import Manifest, is_blank_text
from alignpipe.data.media import resolve_ref


@dataclass
class UnitPlan:
    """One work unit's rows, reduced to unique items in the order they will be encoded."""

    unit: int
    start: int
    ids: list[str]
    values: list              # the value to prepare for each unique item
    row_item: np.ndarray      # row offset -> unique item index, -1 when the cell itself is bad
    row_reason: dict[int, str]
    item_rows: np.ndarray     # rows per unique item (for progress)
    item_reason: dict[int, str] = field(default_factory=dict)
    latents: np.ndarray | None = None
    item_ok: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    plan: UnitPlan
    items: np.ndarray
    tensors: dict[str, torch.Tensor]


def plan_unit(manifest: Manifest, column: str, modality: str, unit: int, start: int,
              stop: int, sort_key: Callable | None) -> UnitPlan:
    """Map a unit's rows to unique items; cells that are empty fail here, before decoding."""
    cells = manifest.table.column(column).slice(start, stop - start).to_pylist()
    ids = manifest.table.column("id").slice(start, stop - start).to_pylist()
    index: dict[str, int] = {}
    values: list = []
    row_item = np.full(len(cells), -1, dtype=np.int64)
    row_reason: dict[int, str] = {}
    for offset, cell in enumerate(cells):
        if is_blank_text(cell):
            row_reason[offset] = ("empty text" if modality == "text"
                                  else f"no {modality} path in column {column!r}")
            continue
        value = str(cell) if modality == "text" else resolve_ref(str(cell), manifest.root)
        key = value if modality == "text" else value.key
        if key not in index:
            index[key] = len(values)
            values.append(value)
        row_item[offset] = index[key]
    if sort_key is not None and values:
        # Length bucketing: encode in sorted order, keep row_item pointing at the same items.
        order = sorted(range(len(values)), key=lambda i: sort_key(values[i]))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        values = [values[i] for i in order]
        row_item = np.where(row_item >= 0, rank[np.maximum(row_item, 0)], -1)
    item_rows = np.bincount(row_item[row_item >= 0], minlength=len(values))
    return UnitPlan(unit, start, ids, values, row_item, row_reason, item_rows)


def unit_result(plan: UnitPlan, column: str, dim: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Rows' latents, valid flags and failure records from a finished plan."""
    latents = np.zeros((plan.rows, dim), dtype=np.float32)
    valid = np.zeros(plan.rows, dtype=bool)
    has_item = plan.row_item >= 0
    if plan.latents is not None and has_item.any():
        items = plan.row_item[has_item]
        latents[has_item] = plan.latents[items]
        valid[has_item] = plan.item_ok[items]
    failures = []
    for offset in np.flatnonzero(~valid):
        item = int(plan.row_item[offset])
        reason = plan.row_reason.get(int(offset)) or plan.item_reason.get(item, "not encoded")
        failures.append({"id": plan.ids[offset], "row": plan.start + int(offset),
                         "column": column, "reason": reason})
    return latents, valid, failures
