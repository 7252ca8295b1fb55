"""What the training loop tells the code around it: events a callback may act on.

`fit(..., callbacks=[...])` hands each callback to the loop, which calls, in order:

- ``on_fit_start(run_dir, history, names)`` once, when the loop starts (after a resume has
  restored its checkpoint: `history` then holds the epochs already done, else it is empty);
- ``on_epoch_end(run_dir, history, names)`` after each validated epoch, once its line is in
  metrics.jsonl and its heads and checkpoint are saved (`history[-1]` is that epoch);
- ``on_fit_end(run_dir, history, names)`` once the last epoch is done (also when a resume finds
  nothing left to train), not after a diverged or interrupted run.

`run_dir` is the run folder, `history` every epoch's record so far, oldest first, as in
metrics.jsonl (epoch, step, train_loss, lr, pairs_per_s, val, ...), and `names` the two stores'
modalities (the val directions are named from them). A method that trains nothing (asif) runs no
loop and emits no events. The loop writes no figure itself: the app's `CurvesPNG`
(alignpipe/app/render.py) draws curves.png from these events. A callback may subclass `FitCallback`
(no-op methods) or be any object with the methods it needs; the history is the loop's own list,
so copy it to keep it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EVENTS = ("on_fit_start", "on_epoch_end", "on_fit_end")


class FitCallback:
    """A callback that does nothing; subclass it and override the events you need."""

    def on_fit_start(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        """The loop starts; `history` holds the epochs a resume continues after."""

    def on_epoch_end(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        """An epoch was validated and saved; `history[-1]` is its record."""

    def on_fit_end(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        """The last epoch is done."""


class Callbacks:
    """The callbacks of one fit, called in the order given; a missing method is a no-op."""

    def __init__(self, callbacks: Iterable = ()) -> None:
        self.callbacks = (list(callbacks.callbacks) if isinstance(callbacks, Callbacks)
                          else list(callbacks or ()))
        for callback in self.callbacks:
            if not any(callable(getattr(callback, event, None)) for event in EVENTS):
                raise TypeError(f"{callback!r} is not a fit callback: it has none of "
                                f"{', '.join(EVENTS)}")

    def emit(self, event: str, run_dir: Path, history: list[dict],
             names: tuple[str, str]) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(run_dir, history, names)
