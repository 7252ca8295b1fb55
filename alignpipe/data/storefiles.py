"""A store's files on disk: what each work unit wrote, whether it is still there, and the
leftovers of killed writers.

A unit's completion marker lists the files the unit wrote (its ``latents`` shard, its ``valid``
chunk, its failure table) with their sizes and sha256; a file zarr did not write (a shard of fill
values only) is listed as ``None``. The cheap check compares existence and size, the full check
also the sha256. Writers clear leftovers only while they hold the store's lock, so no live
writer's temporary file is ever removed.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path

from alignpipe.data.manifest import file_sha256
from alignpipe.util.fsutil import fsync_dir, remove_temp_files

FAILURES_SUFFIX = ".failures.parquet"
STAGING_MARK = ".staging-"
ASIDE_MARK = ".old-"


def rename(source: Path, target: Path) -> None:
    """The one rename every swap step goes through (atomic within a file system)."""
    os.replace(source, target)


def failures_file(store: Path) -> Path:
    """The merged failure table beside a store folder."""
    return store.with_name(store.name + FAILURES_SUFFIX)


def file_record(path: Path) -> dict | None:
    """Size and sha256 of `path` (synced to disk first), or None when there is no such file.

    The sync makes a marker written after it never outlive the data it describes.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"size": size, "sha256": file_sha256(path)}


def file_problems(root: Path, files: dict[str, dict | None], checksums: bool) -> list[str]:
    """What differs between the files under `root` and their records (empty when intact)."""
    problems = []
    for name, record in files.items():
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if record is None:
            if size is not None:
                problems.append(f"{name} exists but the unit wrote no such file")
        elif size is None:
            problems.append(f"{name} is missing")
        elif size != record.get("size"):
            problems.append(f"{name} is {size} bytes, {record.get('size')} when written")
        elif checksums and record.get("sha256") and file_sha256(path) != record["sha256"]:
            problems.append(f"{name} does not match its sha256")
    return problems


def _siblings(store: Path, mark: str, dots: str = ".") -> list[Path]:
    pattern = glob.escape(str(store.with_name(f"{dots}{store.name}{mark}"))) + "*"
    return [Path(p) for p in glob.glob(pattern)]


def remove_folder_and_failures(path: Path) -> None:
    # the table first: a kill in between must not leave a table without its folder
    failures_file(path).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def staging_path(store: Path) -> Path:
    return store.with_name(f".{store.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}")


def swap_in(staged: Path, store: Path) -> None:
    """Put the finished store `staged` (and its failure table) at `store`.

    The old store is renamed aside (its failure table first, then its folder) and deleted only
    after the new one is in place, so at every moment one whole store exists: at `store`, or
    aside, from where `remove_leftovers` puts it back after a kill.
    """
    aside = store.with_name(f".{store.name}{ASIDE_MARK}{uuid.uuid4().hex[:8]}")
    if store.exists():
        if failures_file(store).exists():
            rename(failures_file(store), failures_file(aside))
        rename(store, aside)
    if failures_file(staged).exists():
        rename(failures_file(staged), failures_file(store))
    rename(staged, store)
    fsync_dir(store.parent)
    remove_folder_and_failures(aside)


def set_aside(store: Path) -> list[Path]:
    """Old stores that a swap cut short left beside `store` (put back by `remove_leftovers`)."""
    return [p for p in _siblings(store, ASIDE_MARK) if p.is_dir()]


def remove_leftovers(store: Path) -> list[Path]:
    """Clear what killed writers of `store` left; call only while holding the store's lock.

    Staging folders of killed imports are removed; an old store set aside by a swap that was
    cut short is put back if the new one never arrived, removed otherwise; temporary files of
    markers and failure tables are removed. Returns what was removed or restored.
    """
    touched = []
    # `..name.staging-…` are the temporary files of a staged store's failure table
    for staging in _siblings(store, STAGING_MARK) + _siblings(store, STAGING_MARK, ".."):
        if staging.is_dir():
            remove_folder_and_failures(staging)
        else:
            staging.unlink(missing_ok=True)
        touched.append(staging)
    for aside in _siblings(store, ASIDE_MARK):
        if not aside.is_dir():
            continue  # a failure table: handled below or with its folder
        if not store.exists():  # killed after setting the old store aside: put it back
            if failures_file(aside).exists():
                rename(failures_file(aside), failures_file(store))
            else:  # the new store's table may have arrived already
                failures_file(store).unlink(missing_ok=True)
            rename(aside, store)
        else:
            remove_folder_and_failures(aside)
        touched.append(aside)
    for table in _siblings(store, ASIDE_MARK):
        # its folder never left `store` (killed between the two renames of the old store)
        if not failures_file(store).exists() and store.exists():
            rename(table, failures_file(store))
        else:
            table.unlink(missing_ok=True)
        touched.append(table)
    temp_pattern = glob.escape(str(store.with_name(f".{store.name}{FAILURES_SUFFIX}"))) + ".tmp-*"
    for temp in map(Path, glob.glob(temp_pattern)):
        temp.unlink(missing_ok=True)
        touched.append(temp)
    removed = remove_temp_files(store / "units")
    if removed:
        touched.append(store / "units")
    return touched


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (innermost first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break
