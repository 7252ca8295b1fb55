"""The one exception family for user mistakes.

The CLI turns any `AlignpipeError` into a one-paragraph message and a non-zero exit code
instead of a traceback; library callers can catch it like any other exception.
"""

from __future__ import annotations

from collections.abc import Sequence

SHOWN = 10  # how many rows or names a message lists before "(and N more)"


class AlignpipeError(Exception):
    """A problem with the user's input or environment (not a bug in alignpipe)."""

    exit_code = 2


class ManifestError(AlignpipeError):
    """The manifest is unreadable or violates the manifest format."""


class StoreError(AlignpipeError):
    """A latent store is missing, malformed, or does not match what it is used with."""


class ImportDataError(AlignpipeError):
    """Embeddings given to `alignpipe import` do not fit the manifest."""


def format_rows(rows: Sequence[object], limit: int = SHOWN, sep: str = ", ") -> str:
    """Row numbers (or names) for a message, e.g. ``3, 8, 12 (and 40 more)``: enough to find
    the problem without flooding the terminal."""
    shown = sep.join(str(r) for r in rows[:limit])
    rest = len(rows) - limit
    return f"{shown} (and {rest} more)" if rest > 0 else shown
