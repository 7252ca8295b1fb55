"""The toy dataset as a manifest builder (``alignpipe manifest toy``, ``make: {kind: toy}``)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.builders.registry import Option, register_builder
from alignpipe.errors import AlignpipeError


@register_builder("toy", writes_folder=True, options=(
    Option("out", Path, positional=True, help="Output folder."),
    Option("rows", int, 600, "Rows (captions) to make."),
    Option("seed", int, 0, "Random seed; the same seed gives the same bytes."),
    Option("captions_per_item", int, 2, "Rows sharing one image and clip.")))
def _toy_builder(out, rows, seed, captions_per_item, progress=False):
    """Generate the deterministic toy image–text–audio dataset."""
    from alignpipe.toy import make_toy

    if rows < 1 or captions_per_item < 1:
        raise AlignpipeError("--rows and --captions-per-item must be at least 1")
    paths = make_toy(out, rows=rows, seed=seed, captions_per_item=captions_per_item,
                     progress=progress and rows > 5000)
    return f"wrote {paths['manifest']} ({rows} rows) and {paths['prompts']}"
