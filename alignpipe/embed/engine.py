"""Running work units in one process: decode threads -> collator -> device -> writer thread.

- Decode threads (`DecodePool`) turn manifest cells into small arrays; a bad cell is a failure
  for its rows, never an exception.
- A collator thread stacks them into batches (pinned on GPU) a few batches ahead.
- The calling thread runs the encoder under inference mode and autocast, copies latents back
  without waiting, and only syncs one batch later, so the device never waits for the host.
- A writer thread writes each finished unit (shard, failures, marker) while the next computes.

Within a unit every media item (same resolved path, same text) is decoded and encoded once;
texts are sorted by length so batches pad little, and latents return to manifest order.
Batches never span units, so a unit's latents do not depend on which other units ran.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from alignpipe.embed.pool import DecodePool
from alignpipe.encoders import Encoder
from alignpipe.encoders.base import autocast
from alignpipe.manifest import Manifest
from alignpipe.media import resolve_ref
from alignpipe.store import LatentStore

DECODE_TIMEOUT_S = float(os.environ.get("ALIGNPIPE_DECODE_TIMEOUT", "120"))
# Test hook: sleep this long after each batch, so a test can kill a run mid-way.
THROTTLE_ENV = "ALIGNPIPE_EMBED_THROTTLE_S"
PREFETCH_BATCHES = 3


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


@dataclass
class UnitStats:
    rows: int = 0
    valid: int = 0
    failed: int = 0
    encoded: int = 0
    units: int = 0

    def add(self, other: UnitStats | dict) -> None:
        other = other if isinstance(other, dict) else other.__dict__
        for key in self.__dict__:
            setattr(self, key, getattr(self, key) + int(other.get(key, 0)))


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
        if cell is None or not str(cell).strip():
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


class _Writer:
    """Writes finished units on a background thread; re-raises its errors in the caller."""

    def __init__(self, store: LatentStore):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="alignpipe-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_unit(*job)
                except BaseException as err:  # surfaced by submit/close in the main thread
                    self.error = err

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, unit: int, latents, valid, failures, stats: dict) -> None:
        self._check()
        self.queue.put((unit, latents, valid, failures, stats))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


class UnitRunner:
    """Runs work units of one store through one loaded encoder."""

    def __init__(self, encoder: Encoder, manifest: Manifest, store: LatentStore, column: str,
                 *, batch_size: int, workers: int, dtype: torch.dtype,
                 decode_timeout: float | None = None):
        self.encoder, self.manifest, self.store, self.column = encoder, manifest, store, column
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.dtype = dtype
        self.device = encoder.device
        self.timeout = decode_timeout or DECODE_TIMEOUT_S
        self.throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)

    # ---- producer side (threads) -----------------------------------------------------------------
    def _plans(self, units: list[int]) -> Iterator[UnitPlan]:
        for unit in units:
            start, stop = self.store.unit_range(unit)
            yield plan_unit(self.manifest, self.column, self.encoder.modality, unit, start, stop,
                            self.encoder.sort_key)

    def _collate(self, plan: UnitPlan, items: list[int], prepared: list) -> Batch:
        tensors = self.encoder.collate(prepared)
        if self.device.type == "cuda":
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return Batch(plan, np.asarray(items), tensors)

    def _produce(self, units: list[int], out: queue.Queue, stop: threading.Event) -> None:
        pool = DecodePool(self.encoder.prepare, self.workers, self.timeout)
        window = max(2 * self.batch_size, 4 * self.workers)
        try:
            for plan in self._plans(units):
                items, prepared = [], []
                for i, outcome in enumerate(pool.map(plan.values, window)):
                    if stop.is_set():
                        return
                    if not outcome.ok:
                        plan.item_reason[i] = outcome.reason
                        continue
                    items.append(i)
                    prepared.append(outcome.value)
                    if len(items) == self.batch_size:
                        out.put(self._collate(plan, items, prepared))
                        items, prepared = [], []
                if items:
                    out.put(self._collate(plan, items, prepared))
                out.put(plan)  # the plan itself marks the end of its unit
            out.put(None)
        except BaseException as err:  # a collate bug must stop the run, not hang it
            out.put(err)
        finally:
            pool.close()

    # ---- consumer side (this thread) -------------------------------------------------------------
    def _launch(self, batch: Batch):
        """Start the forward pass and the copy back; returns what `_land` waits for."""
        tensors = {k: v.to(self.device, non_blocking=True) for k, v in batch.tensors.items()}
        with torch.inference_mode():
            with autocast(self.device, self.dtype):
                latents = self.encoder.forward(tensors)
            latents = latents.float()
        if self.device.type != "cuda":
            return batch, latents.numpy(), None
        host = torch.empty(latents.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(latents, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return batch, host, event

    def _land(self, launched) -> int:
        batch, host, event = launched
        if event is not None:
            event.synchronize()
            host = host.numpy()
        plan = batch.plan
        if plan.latents is None:
            plan.latents = np.zeros((len(plan.values), host.shape[1]), dtype=np.float32)
            plan.item_ok = np.zeros(len(plan.values), dtype=bool)
        finite = np.isfinite(host).all(axis=1)
        plan.latents[batch.items] = host
        plan.item_ok[batch.items] = finite
        for i in batch.items[~finite]:
            plan.item_reason[int(i)] = "encoder output is not finite (half-precision overflow?)"
        return int(plan.item_rows[batch.items].sum())

    def run(self, units: list[int], progress: Callable[[int], None] | None = None) -> UnitStats:
        """Encode and write `units`; returns counts over their rows."""
        stats = UnitStats()
        if not units:
            return stats
        feed: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(units, feed, stop),
                                    name="alignpipe-collate", daemon=True)
        writer = _Writer(self.store)
        producer.start()
        in_flight = None
        counted: dict[int, int] = {}
        try:
            while (message := feed.get()) is not None:
                if isinstance(message, BaseException):
                    raise message
                if isinstance(message, Batch):
                    launched = self._launch(message)
                    stats.encoded += len(message.items)
                    if in_flight is not None:
                        self._advance(in_flight, counted, progress)
                    in_flight = launched
                    if self.throttle:
                        time.sleep(self.throttle)
                    continue
                if in_flight is not None:
                    self._advance(in_flight, counted, progress)
                    in_flight = None
                self._finish(message, writer, stats, counted, progress)
            writer.close()
        finally:
            stop.set()
            _drain(feed)
        return stats

    def _advance(self, launched, counted: dict[int, int], progress) -> None:
        rows = self._land(launched)
        unit = launched[0].plan.unit
        counted[unit] = counted.get(unit, 0) + rows
        if progress:
            progress(rows)

    def _finish(self, plan: UnitPlan, writer: _Writer, stats: UnitStats,
                counted: dict[int, int], progress) -> None:
        latents, valid, failures = unit_result(plan, self.column, self.store.dim)
        n_valid = int(valid.sum())
        writer.submit(plan.unit, latents, valid, failures, {"items": len(plan.values)})
        stats.add({"rows": plan.rows, "valid": n_valid, "failed": plan.rows - n_valid,
                   "units": 1})
        if progress:
            progress(plan.rows - counted.pop(plan.unit, 0))


def _drain(feed: queue.Queue) -> None:
    """Unblock a producer stuck on a full queue after the consumer stopped early."""
    try:
        while True:
            feed.get_nowait()
    except queue.Empty:
        pass
