"""Turning unit plans into batches: on forked worker processes, or on threads.

Both decoders cut a unit's unique items into the same fixed chunks of `batch_size` and batch
the good items of each chunk, so a unit's batches (and so its latents, bit for bit) do not
depend on which decoder ran, how many workers there were, or which other units ran.

Processes are the default for images and audio: decoding small files is mostly Python overhead,
which threads cannot parallelise. Threads serve text (nothing to decode), platforms without
fork, and daemonic parents (a dask worker started with ``distributed.worker.daemon``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from itertools import islice

import numpy as np

from alignpipe.embed.plan import Batch, UnitPlan
from alignpipe.embed.pool import DecodePool, Outcome
from alignpipe.embed.procpool import ProcessPool, fork_available
from alignpipe.encoders import Encoder
from alignpipe.media import MediaError

DECODER_ENV = "ALIGNPIPE_DECODER"  # "threads" or "processes": force one (tests, debugging)


class ThreadDecoder:
    def __init__(self, encoder: Encoder, batch_size: int, workers: int, timeout: float):
        self.encoder, self.batch_size, self.workers, self.timeout = (
            encoder, batch_size, workers, timeout)

    def iterate(self, plans: Iterator[UnitPlan]) -> Iterator[Batch | UnitPlan]:
        # Text has nothing to decode: preparing it inline beats handing it to threads.
        pool = (None if self.encoder.modality == "text"
                else DecodePool(self.encoder.prepare, self.workers, self.timeout))
        window = max(2 * self.batch_size, 4 * self.workers)
        try:
            for plan in plans:
                outcomes = (pool.map(plan.values, window) if pool is not None
                            else map(_inline(self.encoder.prepare), plan.values))
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
        finally:
            if pool is not None:
                pool.close()


def _inline(prepare):
    def run(value) -> Outcome:
        try:
            return Outcome(True, prepare(value))
        except MediaError as err:
            return Outcome(False, reason=str(err))

    return run


class ProcessDecoder:
    def __init__(self, encoder: Encoder, batch_size: int, workers: int, timeout: float):
        self.encoder, self.batch_size, self.workers, self.timeout = (
            encoder, batch_size, workers, timeout)

    def iterate(self, plans: Iterator[UnitPlan]) -> Iterator[Batch | UnitPlan]:
        pool = ProcessPool(self.encoder.prepare, self.encoder.collate, self.workers,
                           self.timeout)
        queued: deque[tuple[int | None, UnitPlan]] = deque()  # (task id | None = unit end, plan)
        depth = max(2, 2 * self.workers)
        next_id = 0
        try:
            for plan in plans:
                for start in range(0, len(plan.values), self.batch_size):
                    chunk = list(enumerate(plan.values[start:start + self.batch_size], start))
                    pool.submit(next_id, chunk)
                    queued.append((next_id, plan))
                    next_id += 1
                    while sum(t is not None for t, _ in queued) > depth:
                        yield from self._pop(pool, queued)
                queued.append((None, plan))
            while queued:
                yield from self._pop(pool, queued)
        finally:
            pool.close()

    @staticmethod
    def _pop(pool: ProcessPool, queued: deque) -> Iterator[Batch | UnitPlan]:
        task_id, plan = queued.popleft()
        if task_id is None:
            yield plan
            return
        done = pool.result(task_id)
        for index, reason in done.failed:
            plan.item_reason[index] = reason
        if done.ok:
            yield Batch(plan, np.asarray(done.ok), done.tensors)


def make_decoder(encoder: Encoder, batch_size: int, workers: int, timeout: float):
    forced = os.environ.get(DECODER_ENV, "")
    use_processes = (forced == "processes" or (not forced and encoder.modality != "text")
                     ) and fork_available()
    cls = ProcessDecoder if use_processes else ThreadDecoder
    return cls(encoder, batch_size, workers, timeout)
