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

from alignpipe.media import MediaError

_POLL_S = 0.05


@dataclass
class Outcome:
    """The result of preparing one item: `value` when `ok`, else the failure `reason`."""

    ok: bool
    value: Any = None
    reason: str = ""


class _Task:
    def __init__(self, arg: Any):
        self.arg = arg
        self.started: float | None = None
        self.outcome: Outcome | None = None
        self.abandoned = False
        self.done = threading.Event()

    def run(self, fn: Callable[[Any], Any]) -> None:
        self.started = time.monotonic()
        try:
            self.outcome = Outcome(True, fn(self.arg))
        except MediaError as err:
            self.outcome = Outcome(False, reason=str(err))
        except Exception as err:  # any decoder error is this item's failure, never the run's
            self.outcome = Outcome(False, reason=f"cannot decode {self.arg}: "
                                                 f"{type(err).__name__}: {err}")
        self.done.set()

    def overdue(self, timeout: float) -> bool:
        return (not self.done.is_set() and self.started is not None
                and time.monotonic() - self.started > timeout)


class DecodePool:
    """`map` runs `fn` over values on `workers` threads and yields Outcomes in input order."""

    def __init__(self, fn: Callable[[Any], Any], workers: int, timeout: float):
        self.fn = fn
        self.timeout = timeout
        self.tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self.threads = 0
        for _ in range(max(1, workers)):
            self._spawn()

    def _spawn(self) -> None:
        self.threads += 1
        threading.Thread(target=self._work, name="alignpipe-decode", daemon=True).start()

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            task.run(self.fn)
            if task.abandoned:
                return  # a replacement thread was started when this one was given up on

    def _abandon_overdue(self, pending: Iterable[_Task]) -> None:
        for task in pending:
            if not task.abandoned and task.overdue(self.timeout):
                task.abandoned = True
                task.outcome = Outcome(False, reason=(
                    f"decoding {task.arg} took longer than {self.timeout:g} s "
                    f"(hung or pathological file); skipped"))
                self._spawn()

    def _wait(self, task: _Task, pending: deque[_Task]) -> Outcome:
        while not task.done.wait(_POLL_S):
            # Check every waiting task, not just the head: if all threads hang behind the head,
            # the head would never start.
            self._abandon_overdue([task, *pending])
            if task.abandoned:
                break
        return task.outcome  # type: ignore[return-value]

    def map(self, values: Iterable[Any], window: int) -> Iterator[Outcome]:
        """Outcomes in order; at most `window` items decoded ahead of the consumer."""
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
        while pending:
            task = pending.popleft()
            outcome = self._wait(task, pending)
            submit()
            yield outcome

    def close(self) -> None:
        for _ in range(self.threads):
            self.tasks.put(None)
