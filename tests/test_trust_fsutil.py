"""Issue 8 item 14 (one atomic-write helper) and item 17 (disk errors are one line)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.util import fsutil
from alignpipe.util.fsutil import (
    DiskError,
    LockedError,
    atomic_path,
    atomic_write_text,
    exclusive_lock,
    os_errors,
    remove_temp_files,
)

PACKAGE = Path(fsutil.__file__).parent


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_file_and_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path.resolve()  # the temp file, before the rename
    assert Path(synced[1]) == tmp_path.resolve()  # the folder, after it


def test_concurrent_writers_never_share_a_temp_file(tmp_path):
    target = tmp_path / "result.json"
    errors = []

    def write(i):
        try:
            for _ in range(30):
                atomic_write_text(target, json.dumps({"writer": i, "pad": "x" * 5000}))
        except Exception as err:  # pragma: no cover - the failure we look for
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(target.read_text())["writer"] in range(4)  # whole, never torn
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_no_module_writes_then_renames_by_hand():
    """Every write-then-rename goes through fsutil: no hand-made temp names elsewhere."""
    offenders = []
    pattern = re.compile(r"with_name\(f?[\"']\.[^\"']*(tmp|\.tmp)")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "fsutil.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_leftover_temp_files_are_swept(tmp_path):
    (tmp_path / f".x.json{fsutil.TEMP_MARK}abc").write_text("junk")
    (tmp_path / "x.json").write_text("keep")
    assert remove_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_second_live_writer_is_refused(tmp_path):
    lock = tmp_path / "store.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from alignpipe.util.fsutil import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}, 'x'):\n"
         "    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"store S .*pid {holder.pid}"), \
                exclusive_lock(lock, "store S"):
            pass
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock is stale and taken over.
    assert lock.exists()
    with exclusive_lock(lock, "store S"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_disk_errors_name_the_path():
    with pytest.raises(DiskError, match=r"/data/x.parquet: no space left"), \
            os_errors("/data/x.parquet"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as caught, os_errors("/data/x"):
        raise OSError(errno.EIO, "I/O error")  # not a disk-full kind: left alone
    assert not isinstance(caught.value, DiskError)
    # a failed atomic write names the file it was writing, not its temporary sibling
    with pytest.raises(DiskError, match=r"^/data/runs/e\.json: the file system is read-only"), \
            os_errors("/data/runs/e.json"):
        raise OSError(errno.EROFS, "Read-only file system", "/data/runs/.e.json.tmp-0123456789ab")


def test_full_disk_in_a_command_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(pq, "write_table", full)
    result = CliRunner().invoke(app, ["manifest", "toy", str(tmp_path / "t"), "--rows", "20"])
    assert result.exit_code == DiskError.exit_code, result.output
    assert "no space left on the device" in result.output
    assert "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit)


def test_a_lock_that_cannot_be_removed_does_not_mask_the_real_error(tmp_path, monkeypatch):
    lock = tmp_path / "s.lock"

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with pytest.raises(RuntimeError, match="the body's own error"):
        with exclusive_lock(lock, "store S"):
            monkeypatch.setattr(Path, "unlink", read_only)
            raise RuntimeError("the body's own error")


def test_a_lock_file_is_never_seen_empty_while_its_holder_lives(tmp_path, monkeypatch):
    """The holder is published whole, so a second process never reads an empty lock and
    mistakes it for a crash's leftover (which would let both hold it)."""
    lock = tmp_path / "s.lock"
    seen = []
    real_link = os.link

    def watching_link(source, target):
        real_link(source, target)
        seen.append(Path(target).read_text())

    monkeypatch.setattr(os, "link", watching_link)
    with exclusive_lock(lock, "store S"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert seen and json.loads(seen[0])["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == []
