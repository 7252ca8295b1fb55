"""What every CLI command shares: the consoles, `friendly` (user mistakes become one line and
an exit code, never a traceback), the --threads option and --set parsing.

Commands live in `alignpipe.app.cli` and in the modules it lists in ``COMMAND_MODULES``; they all
import these from here, so no command module imports the CLI back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import DiskError, describe_os_error

console = Console()
err_console = Console(stderr=True)


def _disk_errors_as_user_errors(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """A full disk, a read-only folder or missing permissions is the user's to fix, not a bug:
    it becomes a DiskError naming the path. Any other OSError keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        raise DiskError(message) from None


def friendly(fn: Callable) -> Callable:
    """Turn user mistakes (AlignpipeError) into a clear message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return _disk_errors_as_user_errors(fn, *args, **kwargs)
        except AlignpipeError as err:
            err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False,
                              soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; finished work units are kept, rerun to resume")
            raise typer.Exit(code=130) from None

    return wrapper


ThreadsOption = Annotated[int | None, typer.Option(
    help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs the load "
         "average leaves free).", min=1)]


def use_threads(threads: int | None) -> None:
    """Size torch's CPU thread pool before any work (a busy machine otherwise thrashes)."""
    from alignpipe.util.devices import set_threads

    set_threads(threads)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise AlignpipeError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


