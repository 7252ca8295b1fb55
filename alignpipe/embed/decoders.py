"""Turning unit plans into batches: on forked worker processes, or on threads.

Both decoders cut a unit's unique items into the same fixed chunks of `batch_size` and batch
the good items of each chunk, so a unit's batches (and so its latents, bit for bit) do not
depend on which decoder ran, how many workers there were, or which other units ran.

Processes are the default for images and audio: decoding small files is mostly Python overhead,
which threads cannot parallelise. Threads serve text (nothing to decode), platforms without
fork, and daemonic parents (a dask worker started with ``distributed.worker.daemon``).

A process keeps one pool per encoder (`shared_pool`) and reuses it across units and dask tasks;
a pool left with work outstanding (the run failed or was stopped) is closed, not reused.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np

from alignpipe.data.media import MediaError
from alignpipe.embed.decode_processes import ProcessPool, fork_available
from alignpipe.embed.decode_threads import DecodePool, Outcome, Stopped
from alignpipe.embed.plan import Batch, UnitPlan
from alignpipe.encoders import Encoder

DECODER_ENV = "ALIGNPIPE_DECODER"  # "threads" or "processes": force one (tests, debugging)

# The idle pool of this process, per kind: (encoder, settings, pool). A pool in use is taken
# out, so two runs at once in one process never share one.
_IDLE: dict[str, tuple[Encoder, tuple, object]] = {}
_IDLE_LOCK = threading.Lock()


@contextmanager
def shared_pool(kind: str, encoder: Encoder, settings: tuple,
                make: Callable[[], object]) -> Iterator[object]:
    """This process's pool for `encoder`, made by `make` when there is none fit to reuse.

    The body sets ``pool.reusable`` once it finished cleanly; otherwise the pool is closed."""
    with _IDLE_LOCK:
        held = _IDLE.pop(kind, None)
    if held is not None and (held[0] is not encoder or held[1] != settings
                             or held[2].closed):
        held[2].close()  # a process serves one encoder at a time
        held = None
    pool = held[2] if held is not None else make()
    pool.reusable = False
    try:
        yield pool
    finally:
        if pool.reusable and not pool.closed:
            with _IDLE_LOCK:
                other = _IDLE.pop(kind, None)
                _IDLE[kind] = (encoder, settings, pool)
            if other is not None:
                other[2].close()
        else:
            pool.close()


def close_pools() -> None:
    """Close this process's idle decode pools (when its encoder is dropped)."""
    with _IDLE_LOCK:
        held = list(_IDLE.values())
        _IDLE.clear()
    for _, _, pool in held:
        pool.close()


class ThreadDecoder:
    def __init__(self, encoder: Encoder, batch_size: int, workers: int,
                 timeout: float) -> None:
        self.encoder, self.batch_size, self.workers, self.timeout = (
            encoder, batch_size, workers, timeout)

    def iterate(self, plans: Iterator[UnitPlan],
                stop: threading.Event | None = None) -> Iterator[Batch | UnitPlan]:
        # Text has nothing to decode: preparing it inline beats handing it to threads.
        if self.encoder.modality == "text":
            yield from self._batches(plans, None, stop)
            return
        with shared_pool("threads", self.encoder, (self.workers, self.timeout),
                         lambda: DecodePool(self.encoder.prepare, self.workers,
                                            self.timeout)) as pool:
            yield from self._batches(plans, pool, stop)
            pool.reusable = True

    def _batches(self, plans: Iterator[UnitPlan], pool: DecodePool | None,
                 stop: threading.Event | None) -> Iterator[Batch | UnitPlan]:
        window = max(2 * self.batch_size, 4 * self.workers)
        for plan in plans:
            if stop is not None and stop.is_set():
                raise Stopped
            outcomes = (pool.map(plan.values, window, stop) if pool is not None
                        else map(_inline(self.encoder.prepare), plan.values))
            with _closing(outcomes):
                for start in range(0, len(plan.values), self.batch_size):
                    items, prepared = [], []
                    for i, outcome in enumerate(islice(outcomes, self.batch_size), start):
                        if outcome.ok:
                            items.append(i)
                            prepared.append(outcome.value)
                        else:
                            plan.item_reason[i] = outcome.reason
                    if items:
                        yield Batch(plan, np.asarray(items), self.encoder.collate(prepared))
            yield plan  # the plan itself marks the end of its unit


@contextmanager
def _closing(iterator: Iterator[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _inline(prepare: Callable[[Any], Any]) -> Callable[[Any], Outcome]:
    def run(value: Any) -> Outcome:
        try:
            return Outcome(True, prepare(value))
        except MediaError as err:
            return Outcome(False, reason=str(err))

    return run


class ProcessDecoder:
    def __init__(self, encoder: Encoder, batch_size: int, workers: int,
                 timeout: float) -> None:
        self.encoder, self.batch_size, self.workers, self.timeout = (
            encoder, batch_size, workers, timeout)

    def iterate(self, plans: Iterator[UnitPlan],
                stop: threading.Event | None = None) -> Iterator[Batch | UnitPlan]:
        with shared_pool("processes", self.encoder, (self.workers, self.timeout),
                         lambda: ProcessPool(self.encoder.prepare, self.encoder.collate,
                                             self.workers, self.timeout)) as pool:
            yield from self._batches(plans, pool, stop)
            pool.reusable = pool.idle

    def _batches(self, plans: Iterator[UnitPlan], pool: ProcessPool,
                 stop: threading.Event | None) -> Iterator[Batch | UnitPlan]:
        queued: deque[tuple[int | None, UnitPlan]] = deque()  # (task id | None = unit end, plan)
        depth = max(2, 2 * self.workers)
        for plan in plans:
            for start in range(0, len(plan.values), self.batch_size):
                chunk = list(enumerate(plan.values[start:start + self.batch_size], start))
                queued.append((pool.submit(chunk), plan))
                while sum(t is not None for t, _ in queued) > depth:
                    yield from self._pop(pool, queued, stop)
            queued.append((None, plan))
        while queued:
            yield from self._pop(pool, queued, stop)

    @staticmethod
    def _pop(pool: ProcessPool, queued: deque,
             stop: threading.Event | None) -> Iterator[Batch | UnitPlan]:
        task_id, plan = queued.popleft()
        if task_id is None:
            yield plan
            return
        done = pool.result(task_id, stop)
        for index, reason in done.failed:
            plan.item_reason[index] = reason
        if done.ok:
            yield Batch(plan, np.asarray(done.ok), done.tensors)


def make_decoder(encoder: Encoder, batch_size: int, workers: int,
                 timeout: float) -> ThreadDecoder | ProcessDecoder:
    forced = os.environ.get(DECODER_ENV, "")
    use_processes = (forced == "processes" or (not forced and encoder.modality != "text")
                     ) and fork_available()
    cls = ProcessDecoder if use_processes else ThreadDecoder
    return cls(encoder, batch_size, workers, timeout)
