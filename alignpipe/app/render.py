"""What reports write to files: markdown tables and PNG plots (no rich, matplotlib lazily).

Code that writes a report file (a fit's curves through `CurvesPNG`, evaluations, the pipeline
report) uses this module; `report` holds the rich tables of the terminal and re-exports these.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

PLOT_EVERY_S = 30.0  # during a long fit, redraw the curves at most this often


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats to two decimals."""
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- stage-two plots (matplotlib imported lazily: the CLI stays fast) ----------------------------
def _figure(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def _save_png(fig: Figure, plt: Any, path: str | Path) -> None:
    """Write a figure atomically (a reader never sees half a PNG)."""
    from alignpipe.util.fsutil import atomic_path

    fig.tight_layout()
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def plot_fit_curves(path: str | Path, history: list[dict], names: tuple[str, str]) -> None:
    """Training loss and val R@1 (both directions) and mean recall per epoch."""
    plt, fig, (left, right) = _figure(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history], marker=".")
    left.set(xlabel="epoch", ylabel="train loss", title="loss")
    for key in (f"{names[0]}_to_{names[1]}", f"{names[1]}_to_{names[0]}"):
        values = [h.get("val", {}).get(key, {}).get("R@1") for h in history]
        if any(v is not None for v in values):
            right.plot(epochs, values, marker=".", label=f"{key} R@1")
    means = [h.get("val", {}).get("mean_recall") for h in history]
    if any(v is not None for v in means):
        right.plot(epochs, means, marker=".", linestyle="--", label="mean recall (selection)")
        right.legend(fontsize=8)
    right.set(xlabel="epoch", ylabel="val recall (%)", title="validation")
    _save_png(fig, plt, path)


class CurvesPNG:
    """A fit callback (alignpipe/fit/callbacks.py) that draws the run folder's curves.png.

    The CLI's `fit` and the pipeline's fit steps register it: the curves are drawn when the last
    epoch is done and, during a long run, after an epoch at most every PLOT_EVERY_S (a plot costs
    ~0.1 s). A library `fit()` draws nothing unless given ``callbacks=[CurvesPNG()]``.
    """

    def __init__(self, every_s: float = PLOT_EVERY_S) -> None:
        self.every_s = every_s
        self.last = time.perf_counter()
        self.drawn: int | None = None  # epochs in the last figure drawn, if any

    def on_fit_start(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        self.last, self.drawn = time.perf_counter(), None

    def on_epoch_end(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        if time.perf_counter() - self.last > self.every_s:
            self._draw(run_dir, history, names)

    def on_fit_end(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        if history and self.drawn != len(history):
            self._draw(run_dir, history, names)

    def _draw(self, run_dir: Path, history: list[dict], names: tuple[str, str]) -> None:
        from alignpipe.fit.runfolder import CURVES

        plot_fit_curves(Path(run_dir) / CURVES, history, names)
        self.last, self.drawn = time.perf_counter(), len(history)


def plot_recall_curves(path: str | Path, curves: dict[str, list[float]], title: str) -> None:
    """R@K for K = 1..max, one line per direction."""
    plt, fig, ax = _figure(figsize=(5.5, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=name)
    ax.set(xscale="log", xlabel="K", ylabel="R@K (%)", title=title, ylim=(0, 100))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_png(fig, plt, path)


def plot_confusion(path: str | Path, counts: np.ndarray, classes: list[str], title: str) -> None:
    """Row-normalised confusion matrix (true class × predicted class)."""
    import numpy as np

    plt, fig, ax = _figure(figsize=(1.5 + 0.28 * len(classes), 1.2 + 0.28 * len(classes)))
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(100 * counts / totals, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, label="% of true class")
    _save_png(fig, plt, path)


def plot_similarity(path: str | Path, names: list[str],
                    matrices: dict[str, list[list[float]]]) -> None:
    """One heatmap per measure (linear CKA, mutual kNN), values written in the cells."""
    import numpy as np

    plt, fig, axes = _figure(1, len(matrices), figsize=(1 + 3.2 * len(matrices) + 0.3 * len(names),
                                                      1.5 + 0.5 * len(names)))
    axes = np.atleast_1d(axes)
    for ax, (title, matrix) in zip(axes, matrices.items(), strict=True):
        values = np.asarray(matrix, dtype=float)
        ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title.replace("_", " "))
    _save_png(fig, plt, path)
