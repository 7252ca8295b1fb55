"""File-system primitives every writer in alignpipe shares.

- `atomic_path` / `atomic_write_bytes` / `atomic_write_text`: write to a unique temporary name in
  the destination's folder, fsync the file, rename over the destination, fsync the folder. A kill
  at any moment leaves the old file or the new one, never half of one, and two concurrent writers
  to one destination never share a temporary file.
- `exclusive_lock`: one writer per store or run folder. The lock file holds the holder's pid and
  host; a lock left by a dead process on this host is taken over.
- `os_errors`: turns a full disk, a read-only folder or a permission error into one
  `AlignpipeError` naming the path, instead of a raw `OSError` traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alignpipe.util.errors import AlignpipeError

TEMP_MARK = ".tmp-"

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class DiskError(AlignpipeError):
    """Writing failed for a reason outside alignpipe: full disk, read-only folder, permissions."""


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str | None:
    """One line for a disk-level `OSError`, or None when it is not one of those."""
    reason = _DISK_ERRORS.get(exc.errno or -1)
    if reason is None:
        return None
    where = str(exc.filename or path)
    temp = re.fullmatch(rf"(.*/)?\.(.+){re.escape(TEMP_MARK)}[0-9a-f]{{12}}", where)
    if temp:  # an atomic write's temporary sibling: name the file it was to become
        where = (temp.group(1) or "") + temp.group(2)
    return (f"{where}: {reason} while writing; whatever finished before stays valid, so free "
            "the space (or fix the permissions) and run the same command again to resume")


@contextmanager
def os_errors(path: str | Path | None = None) -> Iterator[None]:
    """Re-raise a full-disk / read-only / permission `OSError` as a `DiskError` naming the path."""
    try:
        yield
    except OSError as exc:
        message = describe_os_error(exc, path)
        if message is None:
            raise
        raise DiskError(message) from exc


def temp_name(path: Path) -> Path:
    """A unique sibling of `path` that readers and globbing of real outputs ignore."""
    return path.with_name(f".{path.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; publish it atomically on success.

    For writers that want a file name (pyarrow, safetensors, matplotlib). On any exception the
    temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    with os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def remove_temp_files(folder: str | Path) -> int:
    """Remove temporary files a killed writer left in `folder`; returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for leftover in folder.glob(f".*{TEMP_MARK}*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


# --- locks -------------------------------------------------------------------------------------

class LockedError(AlignpipeError):
    """Another live process is writing the same store or run folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _try_create(lock: Path, holder: dict) -> bool:
    """Publish a complete lock file in one step (link of a written temp file), so a lock file
    is never seen empty while its holder lives: an empty one is a crash's leftover."""
    tmp = temp_name(lock)
    tmp.write_text(json.dumps(holder))
    try:
        os.link(tmp, lock)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create, then write
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(holder))
    finally:
        tmp.unlink(missing_ok=True)
    return True


@contextmanager
def exclusive_lock(lock: str | Path, what: str) -> Iterator[None]:
    """Hold `lock` (a file) while the body runs; refuse if a live process holds it.

    `what` names the thing being protected in the refusal message ("store /c/toy/minilm").
    A lock whose holder is a dead process on this host is stale and taken over. A lock held on
    another host is never taken over: the message says which host and how to clear it.
    """
    lock = Path(lock)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    with os_errors(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if _try_create(lock, holder):
                break
            other = _read_holder(lock)
            same_host = other.get("host") == holder["host"]
            pid = other.get("pid")
            if other and same_host and isinstance(pid, int) and pid != os.getpid() \
                    and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # stale: its holder is dead
                continue
            if not other and lock.exists():
                lock.unlink(missing_ok=True)  # empty or torn: never a live holder's (see above)
                continue
            if not other:
                continue  # released between our two looks
            where = "" if same_host else f" on host {other.get('host')}"
            raise LockedError(
                f"{what} is being written by another alignpipe process (pid {other.get('pid')}"
                f"{where}); wait for it to finish. If no such process exists, delete {lock}")
        else:
            raise LockedError(f"{what}: could not take the lock {lock}; delete it and retry")
    try:
        yield
    finally:
        # Never let the release mask the body's own error (a read-only or full disk): a lock
        # that could not be removed belongs to a dead process next time and is taken over.
        try:
            if _read_holder(lock).get("token") == holder["token"]:
                lock.unlink(missing_ok=True)
        except OSError:
            pass
