"""Decoding in forked worker processes, one batch per task, results in order.

Decoding small images is mostly Python overhead, which threads cannot run in parallel; forked
processes can, and they inherit the loaded encoder's preprocessing without pickling it (like
torch's DataLoader workers). Each task prepares one chunk of a unit's items and collates the
good ones in the worker; the batch comes back through shared memory.

A worker records which item it is on and since when, in shared memory. An item that runs past
the deadline (a hung decoder) or kills its worker (a decoder crash) fails alone: the worker is
killed and replaced, and the rest of its chunk is sent again.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as tmp

from alignpipe.data.media import MediaError
from alignpipe.embed.decode_threads import Stopped
from alignpipe.util.fsutil import DiskError

if TYPE_CHECKING:
    import ctypes
    import threading
    from multiprocessing.queues import Queue

_POLL_S = 0.05
_FIELDS = 3  # per worker: task id, position in the chunk, start time (0 = idle)
_NO_SHM = "no shared memory: "  # a worker's report that its batch cannot be handed over


def fork_available() -> bool:
    """Forked workers need the fork start method and a parent allowed to have children."""
    return ("fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _failure(value: Any, err: BaseException) -> str:
    if isinstance(err, MediaError):
        return str(err)
    return f"cannot decode {value}: {type(err).__name__}: {err}"


def _next_task(tasks: Queue, parent: int) -> tuple | None:
    """The next task, or None once the parent is gone (a killed parent must not leave orphans)."""
    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _worker(slot: int, tasks: Queue, results: Queue, status: ctypes.Array[ctypes.c_double],
            prepare: Callable, collate: Callable, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    faulthandler.disable()  # a decoder crash is reported as that item's failure, not a dump
    torch.set_num_threads(1)  # as DataLoader workers: no thread pools inside forked children
    base = slot * _FIELDS
    while (task := _next_task(tasks, parent)) is not None:
        task_id, attempt, items = task
        ok, prepared, failed = [], [], []
        for position, (index, value) in enumerate(items):
            status[base:base + _FIELDS] = [task_id, position, time.monotonic()]
            try:
                prepared.append(prepare(value))
                ok.append(index)
            except Exception as err:  # a bad item fails alone
                failed.append((index, _failure(value, err)))
        status[base + 2] = 0.0
        try:
            tensors = collate(prepared) if prepared else None
        except Exception:
            results.put((task_id, attempt, None, traceback.format_exc(), failed))
            continue
        try:  # here, not in the queue's feeder thread, where a failure is lost and hangs the run
            tensors = {k: v.share_memory_() if isinstance(v, torch.Tensor) else v
                       for k, v in (tensors or {}).items()} or None
        except RuntimeError as err:  # /dev/shm is full
            results.put((task_id, attempt, None, _NO_SHM + str(err), failed))
            continue
        results.put((task_id, attempt, ok, tensors, failed))


@dataclass
class _Task:
    task_id: int
    items: list[tuple[int, Any]]
    ok: list[int] = field(default_factory=list)
    tensors: dict | None = None
    failed: list[tuple[int, str]] = field(default_factory=list)
    done: bool = False
    attempt: int = 0  # bumped on each resend; a result from an earlier attempt is stale


class ProcessPool:
    """`submit` chunks of (index, value); `result(task_id)` waits for that chunk's batch.

    A process keeps one pool per encoder and reuses it across work units and dask tasks:
    forking workers from a process that holds a CUDA context is done once, not once per task.
    Task ids are unique over the pool's life, so a late result never lands in a later task.
    """

    def __init__(self, prepare: Callable, collate: Callable, workers: int,
                 timeout: float) -> None:
        self.ctx = tmp.get_context("fork")
        self.prepare, self.collate, self.timeout = prepare, collate, timeout
        self.tasks = self.ctx.Queue()
        self.results = self.ctx.Queue()
        self.status = self.ctx.Array("d", _FIELDS * max(1, workers), lock=False)
        self.procs: list = [None] * max(1, workers)
        self.open: dict[int, _Task] = {}
        self.next_id = 0
        self.closed = False
        self.reusable = False  # set by `decoders.shared_pool`'s user after a clean run
        for slot in range(len(self.procs)):
            self._start(slot)

    def _start(self, slot: int) -> None:
        self.status[slot * _FIELDS + 2] = 0.0
        proc = self.ctx.Process(target=_worker, name=f"alignpipe-decode-{slot}", daemon=True,
                                args=(slot, self.tasks, self.results, self.status,
                                      self.prepare, self.collate, os.getpid()))
        proc.start()
        self.procs[slot] = proc

    @property
    def idle(self) -> bool:
        """Open and with no task outstanding: fit to serve the next run."""
        return not self.closed and not self.open

    def submit(self, items: list[tuple[int, Any]]) -> int:
        """Queue one chunk; returns its task id."""
        task_id, self.next_id = self.next_id, self.next_id + 1
        self.open[task_id] = _Task(task_id, items)
        self.tasks.put((task_id, 0, items))
        return task_id

    def result(self, task_id: int, stop: threading.Event | None = None) -> _Task:
        """Wait for a chunk; raises `Stopped` once `stop` is set."""
        task = self.open[task_id]
        while not task.done:
            if stop is not None and stop.is_set():
                raise Stopped
            try:
                self._receive(self.results.get(timeout=_POLL_S))
            except queue.Empty:
                self._check_workers()
        return self.open.pop(task_id)

    def _receive(self, message: tuple) -> None:
        task_id, attempt, ok, tensors, failed = message
        task = self.open.get(task_id)
        if task is None or task.done or attempt != task.attempt:
            # A worker killed as hung may have sent its result just before: the item it was
            # given up on stays failed, and the resent rest of the chunk is what counts.
            return
        if ok is None and tensors.startswith(_NO_SHM):
            raise DiskError(
                f"/dev/shm: no space left for the decode workers to hand batches over "
                f"({tensors.removeprefix(_NO_SHM)}); free space there (docker: --shm-size) "
                f"or pass fewer --workers, and run the same command again to resume")
        if ok is None:
            raise RuntimeError(f"collating a batch failed in a decode worker:\n{tensors}")
        task.ok, task.tensors, task.failed = ok, tensors, task.failed + failed
        task.done = True

    def _check_workers(self) -> None:
        now = time.monotonic()
        for slot, proc in enumerate(self.procs):
            base = slot * _FIELDS
            task = self.open.get(int(self.status[base]))
            position, started = int(self.status[base + 1]), self.status[base + 2]
            pending = task is not None and not task.done
            hung = pending and started > 0 and now - started > self.timeout
            if proc.is_alive() and not hung:
                continue
            if hung:
                reason = (f"decoding took longer than {self.timeout:g} s (hung or pathological "
                          f"file); skipped")
                proc.kill()
            else:
                reason = f"the decoder crashed (worker exit code {proc.exitcode})"
            proc.join()
            self._start(slot)
            if pending:
                self._resend(task, position if started > 0 else None, reason)

    def _resend(self, task: _Task, position: int | None, reason: str) -> None:
        """The item at `position` fails; the chunk's other items are decoded again."""
        if position is not None:
            index, value = task.items[position]
            task.failed.append((index, f"{reason}: {value}"))
            task.items = task.items[:position] + task.items[position + 1:]
        if task.items:
            task.attempt += 1
            self.tasks.put((task.task_id, task.attempt, task.items))
        else:
            task.done = True

    def close(self) -> None:
        self.closed = True
        self.open.clear()
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)
        self.tasks.cancel_join_thread()
        self.results.cancel_join_thread()

