"""Parallel decoding on daemon threads, in order, with a deadline per item.

Decoders (Pillow, libsndfile, soxr, the feature extractors' torch ops) release the GIL, so
threads decode in parallel without pickling anything. A decoder that hangs on a damaged file
cannot be killed, but it can be abandoned: its item fails with a timeout, a fresh thread takes its
place, and the daemon thread never keeps the process alive at exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from alignpipe.data.media import MediaError

_POLL_S = 0.05


@dataclass
class Outcome:
    """The result of preparing one item: `value` when `ok`, else the failure `reason`."""

    ok: bool
    value: Any = None
    reason: str = ""


class Stopped(Exception):
    """The consumer asked the decoders to stop (it failed or was interrupted)."""


class _Task:
    def __init__(self, arg: Any) -> None:
        self.arg = arg
        self.started: float | None = None
        self.outcome: Outcome | None = None
        self.abandoned = False
        self.done = threading.Event()
        self._settle = threading.Lock()

    def claim(self) -> bool:
        """Start the item, unless it was cancelled before any thread took it."""
        with self._settle:
            if self.done.is_set():
                return False
            self.started = time.monotonic()
            return True

    def cancel(self) -> None:
        """Skip the item if no thread has started it (its consumer has gone)."""
        with self._settle:
            if self.started is None and not self.done.is_set():
                self.outcome = Outcome(False, reason="not decoded: the run stopped")
                self.done.set()

    def run(self, fn: Callable[[Any], Any]) -> bool:
        """Prepare the claimed item; False when it was given up on meanwhile (its thread must
        go: a replacement has taken its place)."""
        try:
            outcome = Outcome(True, fn(self.arg))
        except MediaError as err:
            outcome = Outcome(False, reason=str(err))
        except Exception as err:  # any decoder error is this item's failure, never the run's
            outcome = Outcome(False, reason=f"cannot decode {self.arg}: "
                                            f"{type(err).__name__}: {err}")
        return self._finish(outcome, abandoned=False)

    def give_up(self, reason: str) -> bool:
        """Fail the item with `reason` unless it has finished; True when it was given up."""
        return self._finish(Outcome(False, reason=reason), abandoned=True)

    def _finish(self, outcome: Outcome, abandoned: bool) -> bool:
        # The first outcome is final: a decoder that returns after its deadline must not turn
        # the recorded timeout into a success (or the other way round).
        with self._settle:
            if self.done.is_set():
                return False
            self.outcome, self.abandoned = outcome, abandoned
            self.done.set()
            return True

    def overdue(self, timeout: float) -> bool:
        return (not self.done.is_set() and self.started is not None
                and time.monotonic() - self.started > timeout)


class DecodePool:
    """`map` runs `fn` over values on `workers` threads and yields Outcomes in input order.

    One pool serves many `map` calls (a process keeps one per encoder); `close` ends its threads.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, timeout: float) -> None:
        self.fn = fn
        self.timeout = timeout
        self.workers = max(1, workers)
        self.tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.busy: dict[threading.Thread, _Task] = {}  # thread -> the item it decodes
        self.closed = False
        self.reusable = False  # set by `decoders.shared_pool`'s user after a clean run
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        self.threads = [t for t in self.threads if t.is_alive()]
        thread = threading.Thread(target=self._work, name="alignpipe-decode", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while (task := self.tasks.get()) is not None:
            if not task.claim():
                continue
            self.busy[me] = task
            finished = task.run(self.fn)
            self.busy.pop(me, None)
            if not finished:
                return  # given up on: a replacement thread has taken this one's place

    def _abandon_overdue(self, pending: Iterable[_Task]) -> None:
        for task in pending:
            if task.overdue(self.timeout) and task.give_up(
                    f"decoding {task.arg} took longer than {self.timeout:g} s "
                    f"(hung or pathological file); skipped"):
                self._spawn()

    def _wait(self, task: _Task, pending: deque[_Task], stop: threading.Event | None) -> Outcome:
        while not task.done.wait(_POLL_S):
            if stop is not None and stop.is_set():
                raise Stopped
            # Check every waiting task, not just the head: if all threads hang behind the head,
            # the head would never start.
            self._abandon_overdue([task, *pending])
        return task.outcome  # type: ignore[return-value]

    def map(self, values: Iterable[Any], window: int,
            stop: threading.Event | None = None) -> Iterator[Outcome]:
        """Outcomes in order; at most `window` items decoded ahead of the consumer. Raises
        `Stopped` once `stop` is set."""
        source = iter(values)
        pending: deque[_Task] = deque()

        def submit() -> bool:
            for value in source:
                task = _Task(value)
                pending.append(task)
                self.tasks.put(task)
                return True
            return False

        while len(pending) < max(1, window) and submit():
            pass
        try:
            while pending:
                task = pending.popleft()
                outcome = self._wait(task, pending, stop)
                submit()
                yield outcome
        finally:
            for task in pending:  # left behind by a consumer that stopped early: skip them
                task.cancel()

    def close(self, wait: float = 5.0) -> None:
        """Stop the threads; wait up to `wait` s for those not stuck in an abandoned decoder
        (those cannot be stopped; they end with their decoder, or with the process)."""
        self.closed = True
        for _ in range(self.workers):
            self.tasks.put(None)
        deadline = time.monotonic() + wait
        for thread in self.threads:
            task = self.busy.get(thread)
            if task is None or not task.abandoned:
                thread.join(max(0.0, deadline - time.monotonic()))
        self.threads = [t for t in self.threads if t.is_alive()]
