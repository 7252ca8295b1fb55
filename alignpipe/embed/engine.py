"""Running work units in one process: decoders -> batches -> device -> writer thread.

- Decode workers (forked processes, or threads: see `decoders`) turn manifest cells into
  batches; a bad cell is a failure for its rows, never an exception.
- A producer thread keeps a few batches ready (pinned on GPU).
- The calling thread runs the encoder under inference mode and autocast, copies latents back
  without waiting, and only syncs one batch later, so the device never waits for the host.
- A writer thread writes each finished unit (shard, failures, marker) while the next computes.

Batches never span units, so a unit's latents do not depend on which other units ran.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from alignpipe.data.manifest import Manifest
from alignpipe.data.store import LatentStore
from alignpipe.embed.decode_threads import Stopped
from alignpipe.embed.decoders import make_decoder
from alignpipe.embed.plan import Batch, UnitPlan, plan_unit, unit_result
from alignpipe.encoders import Encoder
from alignpipe.encoders.base import autocast
from alignpipe.util.fsutil import os_errors

DECODE_TIMEOUT_S = float(os.environ.get("ALIGNPIPE_DECODE_TIMEOUT", "120"))
# Test hook: sleep this long after each batch, so a test can kill a run mid-way.
THROTTLE_ENV = "ALIGNPIPE_EMBED_THROTTLE_S"
PREFETCH_BATCHES = 3
STOP_WAIT_S = 30.0  # how long a failed run waits for its producer thread to wind down
# A launched batch: the batch, its latents (on the host, or being copied there) and the CUDA
# event that marks the copy done (None off CUDA).
_Launched = tuple[Batch, np.ndarray | torch.Tensor, torch.cuda.Event | None]


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


class _Writer:
    """Writes finished units on a background thread; re-raises its errors in the caller.

    A full disk or a read-only folder surfaces as the `DiskError` naming the path; the unit it
    hit stays unmarked (redone by the next run) and every unit marked before it stays valid.
    """

    def __init__(self, store: LatentStore) -> None:
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="alignpipe-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    unit, latents, valid, failures, stats, ids = job
                    with os_errors(self.store.path):
                        self.store.write_unit(unit, latents, valid, failures, stats, ids=ids)
                except BaseException as err:  # surfaced by submit/close in the main thread
                    self.error = err

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, unit: int, latents: np.ndarray, valid: np.ndarray, failures: list[dict],
               stats: dict, ids: list) -> None:
        self._check()
        self.queue.put((unit, latents, valid, failures, stats, ids))

    def close(self) -> None:
        """Finish the queued units and stop; raises the first write error."""
        self.stop()
        self._check()

    def stop(self) -> None:
        """End the thread after what is queued (on every path: a blocked writer thread would
        outlive the run, and pile up in a long-lived dask worker)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class UnitRunner:
    """Runs work units of one store through one loaded encoder."""

    def __init__(self, encoder: Encoder, manifest: Manifest, store: LatentStore, column: str,
                 *, batch_size: int, workers: int, dtype: torch.dtype,
                 decode_timeout: float | None = None) -> None:
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

    def _produce(self, units: list[int], out: queue.Queue, stop: threading.Event) -> None:
        decoder = make_decoder(self.encoder, self.batch_size, self.workers, self.timeout)
        messages = decoder.iterate(self._plans(units), stop)
        try:
            for message in messages:
                if stop.is_set():
                    return
                if isinstance(message, Batch) and self.device.type == "cuda":
                    message.tensors = {k: v.pin_memory() for k, v in message.tensors.items()}
                out.put(message)
            out.put(None)
        except Stopped:
            return
        except BaseException as err:  # a collate bug must stop the run, not hang it
            if not stop.is_set():
                out.put(err)
        finally:
            messages.close()  # hand the decode pool back (or close it) in this thread, now

    # ---- consumer side (this thread) -------------------------------------------------------------
    def _launch(self, batch: Batch) -> _Launched:
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
        event.record(torch.cuda.current_stream(self.device))  # the model's GPU, not GPU 0
        return batch, host, event

    def _land(self, launched: _Launched) -> int:
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
                                    name="alignpipe-produce", daemon=True)
        writer = _Writer(self.store)
        with self._cpu_share(), _on_device(self.device):
            producer.start()
            try:
                self._consume(feed, writer, stats, progress)
                writer.close()
            finally:
                stop.set()
                _wind_down(producer, feed)
                writer.stop()
        return stats

    @contextmanager
    def _cpu_share(self) -> Iterator[None]:
        """On CPU, leave the decode workers their cores: torch's spinning intra-op threads
        would otherwise fight them for the same cores and both slow to a crawl."""
        if self.device.type != "cpu" or self.encoder.modality == "text":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - self.workers))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _consume(self, feed: queue.Queue, writer: _Writer, stats: UnitStats,
                 progress: Callable[[int], None] | None) -> None:
        in_flight = None
        counted: dict[int, int] = {}
        while (message := feed.get()) is not None:
            if isinstance(message, BaseException):
                raise message
            if isinstance(message, Batch):
                launched = self._launch(message)  # launch batch k+1 before landing batch k
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

    def _advance(self, launched: _Launched, counted: dict[int, int],
                 progress: Callable[[int], None] | None) -> None:
        rows = self._land(launched)
        unit = launched[0].plan.unit
        counted[unit] = counted.get(unit, 0) + rows
        if progress:
            progress(rows)

    def _finish(self, plan: UnitPlan, writer: _Writer, stats: UnitStats,
                counted: dict[int, int], progress: Callable[[int], None] | None) -> None:
        latents, valid, failures = unit_result(plan, self.column, self.store.dim)
        n_valid = int(valid.sum())
        writer.submit(plan.unit, latents, valid, failures, {"items": len(plan.values)},
                      plan.ids)
        stats.add({"rows": plan.rows, "valid": n_valid, "failed": plan.rows - n_valid,
                   "units": 1})
        if progress:
            progress(plan.rows - counted.pop(plan.unit, 0))


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make the encoder's GPU the current one, so streams and pinned copies pair with it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _drain(feed: queue.Queue) -> None:
    """Unblock a producer stuck on a full queue after the consumer stopped early."""
    try:
        while True:
            feed.get_nowait()
    except queue.Empty:
        pass


def _wind_down(producer: threading.Thread, feed: queue.Queue) -> None:
    """Wait for the (stopped) producer to close its decoders, so that no thread or worker of
    this run outlives it and none touches a pool after the process started exiting."""
    deadline = time.monotonic() + STOP_WAIT_S
    while producer.is_alive() and time.monotonic() < deadline:
        _drain(feed)
        producer.join(0.05)
    _drain(feed)
