"""The latent store: the contract between stage one and stage two.

A store is a Zarr v3 group at ``<cache>/<dataset>/<encoder>/`` holding

- ``latents``: rows × dim, float16 (float32 on request); shards of exactly one work unit of rows,
  chunks of about 1-4 MB inside them. A shard is the unit of writing, a chunk the unit of reading.
- ``valid``: rows, bool; false for rows whose media failed (see ``failures.parquet``).
- ``units/``: a subgroup whose folder holds one ``NNNNN.done`` marker per completed work unit and
  that unit's failures; a rerun skips marked units.
- group attrs: ``encoder`` (provenance), ``modality``, ``manifest`` (path, sha256, rows, and
  relative_path from the store when both lie under one folder),
  ``alignpipe_version``, ``created``, ``unit_rows``.

Row i of the store is row i of its manifest. ``zarr.open_group(path)["latents"]`` and
``dask.array.from_zarr(path, component="latents")`` read it without alignpipe.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from alignpipe import __version__
from alignpipe.errors import StoreError
from alignpipe.fsutil import atomic_path, atomic_write_bytes
from alignpipe.manifest import Manifest

DEFAULT_UNIT_ROWS = 8192
TARGET_CHUNK_BYTES = 2 << 20
DTYPES = ("float16", "float32")
MODALITIES = ("image", "text", "audio")
FAILURE_COLUMNS = ("id", "row", "column", "reason")
UNITS_GROUP = "units"


def encoder_dirname(name: str) -> str:
    """Folder name for an encoder: ``hf:facebook/dinov2-large`` -> ``hf-facebook--dinov2-large``."""
    name = name.replace("/", "--").replace(":", "-")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def store_path(cache: str | Path, dataset: str, encoder: str) -> Path:
    return Path(cache) / dataset / encoder_dirname(encoder)


def manifest_attrs(path: Path, manifest_info: dict) -> dict:
    """The store's ``manifest`` attr: `manifest_info` plus ``relative_path`` from the store folder
    to the manifest when the two share a folder below the filesystem root, so that moving both
    together (a copied project, a renamed checkout) keeps the store usable."""
    info = {k: v for k, v in manifest_info.items() if k != "relative_path"}
    if not info.get("path"):
        return info
    store, manifest = Path(path).resolve(), Path(info["path"]).resolve()
    try:
        common = Path(os.path.commonpath([store, manifest]))
    except ValueError:  # different drives
        return info
    if common != Path(common.anchor):
        info["relative_path"] = os.path.relpath(manifest, store)
    return info


def chunk_rows_for(unit_rows: int, dim: int, itemsize: int) -> int:
    """Rows per chunk: the largest divisor of `unit_rows` whose chunk stays within ~2 MB."""
    target = max(1, TARGET_CHUNK_BYTES // max(1, dim * itemsize))
    if unit_rows <= target:
        return unit_rows
    for rows in range(target, 0, -1):
        if unit_rows % rows == 0:
            return rows
    return 1


def write_failures(path: Path, failures: list[dict]) -> None:
    """Write failure records (id, row, column, reason) as parquet, atomically."""
    table = pa.table({
        "id": pa.array([str(f["id"]) for f in failures], pa.string()),
        "row": pa.array([int(f["row"]) for f in failures], pa.int64()),
        "column": pa.array([str(f["column"]) for f in failures], pa.string()),
        "reason": pa.array([str(f["reason"]) for f in failures], pa.string()),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_failures(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.exists() else []


@dataclass
class LatentStore:
    """An open store. Create with `create_store`, open with `open_store`."""

    path: Path
    group: zarr.Group

    # ---- layout -------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @cached_property
    def latents(self) -> zarr.Array:
        return self.group["latents"]  # opened once: each lookup would reread its zarr.json

    @cached_property
    def valid(self) -> zarr.Array:
        return self.group["valid"]

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    @property
    def dim(self) -> int:
        return int(self.latents.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.latents.dtype)

    @property
    def unit_rows(self) -> int:
        return int(self.attrs["unit_rows"])

    @property
    def n_units(self) -> int:
        return max(1, math.ceil(self.rows / self.unit_rows)) if self.rows else 0

    @property
    def encoder(self) -> dict:
        return dict(self.attrs.get("encoder", {}))

    @property
    def modality(self) -> str:
        return str(self.attrs.get("modality", ""))

    @property
    def manifest_info(self) -> dict:
        return dict(self.attrs.get("manifest", {}))

    @property
    def units_dir(self) -> Path:
        return self.path / UNITS_GROUP

    @property
    def failures_path(self) -> Path:
        """Merged failure table, beside the store folder (the store root holds only Zarr)."""
        return self.path.with_name(self.path.name + ".failures.parquet")

    def unit_range(self, unit: int) -> tuple[int, int]:
        if not 0 <= unit < self.n_units:
            raise IndexError(f"work unit {unit} out of range 0..{self.n_units - 1}")
        start = unit * self.unit_rows
        return start, min(start + self.unit_rows, self.rows)

    # ---- work units ---------------------------------------------------------------------------
    def _marker(self, unit: int) -> Path:
        return self.units_dir / f"{unit:05d}.done"

    def _unit_failures(self, unit: int) -> Path:
        return self.units_dir / f"{unit:05d}.failures.parquet"

    def is_done(self, unit: int) -> bool:
        return self._marker(unit).exists()

    def done_units(self) -> list[int]:
        if not self.units_dir.exists():
            return []
        done = []
        for p in self.units_dir.glob("*.done"):
            try:
                done.append(int(p.stem))
            except ValueError:
                continue
        return sorted(u for u in done if u < self.n_units)

    def pending_units(self) -> list[int]:
        done = set(self.done_units())
        return [u for u in range(self.n_units) if u not in done]

    def write_unit(self, unit: int, latents: np.ndarray, valid: np.ndarray,
                   failures: list[dict] | None = None, stats: dict | None = None) -> None:
        """Write one work unit's whole shard, its failures, then its completion marker.

        The marker is written last and atomically, so a kill at any point leaves the unit either
        complete and marked, or unmarked (and redone on the next run).
        """
        start, stop = self.unit_range(unit)
        latents = np.asarray(latents)
        valid = np.asarray(valid, dtype=bool)
        if latents.shape != (stop - start, self.dim):
            raise StoreError(f"{self.path}: unit {unit} needs latents of shape "
                             f"{(stop - start, self.dim)}, got {latents.shape}")
        if valid.shape != (stop - start,):
            raise StoreError(f"{self.path}: unit {unit} needs valid of shape {(stop - start,)}")
        latents = np.where(valid[:, None], latents, 0).astype(self.dtype, copy=False)
        self.latents[start:stop] = latents
        self.valid[start:stop] = valid
        self.units_dir.mkdir(exist_ok=True)
        write_failures(self._unit_failures(unit), failures or [])
        marker = {"unit": unit, "rows": [start, stop], "valid": int(valid.sum()),
                  "failed": len(failures or []), "finished": time.time(), **(stats or {})}
        atomic_write_bytes(self._marker(unit), json.dumps(marker).encode())

    def unit_marker(self, unit: int) -> dict:
        return json.loads(self._marker(unit).read_text()) if self.is_done(unit) else {}

    def failures(self) -> list[dict]:
        """Failure records of all completed units, in row order."""
        records: list[dict] = []
        for unit in self.done_units():
            records.extend(read_failures(self._unit_failures(unit)))
        return sorted(records, key=lambda r: r["row"])

    def merge_failures(self) -> Path:
        """Write the merged ``failures.parquet`` beside the store and return its path."""
        write_failures(self.failures_path, self.failures())
        return self.failures_path

    @property
    def complete(self) -> bool:
        return len(self.done_units()) == self.n_units

    # ---- reading ------------------------------------------------------------------------------
    def read_valid(self) -> np.ndarray:
        return np.asarray(self.valid[:], dtype=bool)

    def read(self, rows: np.ndarray | list[int] | slice | None = None,
             dtype: str | np.dtype = np.float32) -> np.ndarray:
        """Latents of `rows` (all rows by default) as a numpy array of `dtype`."""
        if rows is None:
            out = self.latents[:]
        elif isinstance(rows, slice):
            out = self.latents[rows]
        else:
            idx = np.asarray(rows, dtype=np.int64)
            if idx.size == 0:
                return np.zeros((0, self.dim), dtype=dtype)
            out = self.latents.get_orthogonal_selection((idx, slice(None)))
        return np.asarray(out).astype(dtype, copy=False)

    def check_manifest(self, manifest: Manifest) -> None:
        """Raise StoreError unless this store was built from exactly this manifest."""
        info = self.manifest_info
        if info.get("sha256") != manifest.sha256:
            raise StoreError(
                f"{self.path}: store was built from manifest {info.get('path')} "
                f"(sha256 {str(info.get('sha256'))[:12]}…, {info.get('rows')} rows) but "
                f"{manifest.path} has sha256 {manifest.sha256[:12]}… ({manifest.rows} rows); "
                f"row i of a store must be row i of its manifest, so re-embed or pass the "
                f"original manifest")

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def info(self) -> dict:
        valid = self.read_valid()
        return {
            "path": str(self.path),
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "valid": int(valid.sum()),
            "modality": self.modality,
            "encoder": self.encoder,
            "manifest": self.manifest_info,
            "alignpipe_version": self.attrs.get("alignpipe_version"),
            "created": self.attrs.get("created"),
            "unit_rows": self.unit_rows,
            "units_done": len(self.done_units()),
            "units_total": self.n_units,
            "chunks": list(self.latents.chunks),
            "shards": list(self.latents.shards or self.latents.chunks),
            "size_bytes": self.size_on_disk(),
            "failures": len(self.failures()),
        }


def create_store(path: str | Path, *, rows: int, dim: int, encoder: dict, modality: str,
                 manifest: Manifest | dict, dtype: str = "float16",
                 unit_rows: int = DEFAULT_UNIT_ROWS, overwrite: bool = False,
                 extra_attrs: dict | None = None) -> LatentStore:
    """Create a store at full size. Workers only ever fill shards; nothing resizes later."""
    path = Path(path)
    if dtype not in DTYPES:
        raise StoreError(f"unsupported latent dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if modality not in MODALITIES:
        raise StoreError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if rows < 1 or dim < 1 or unit_rows < 1:
        raise StoreError(f"a store needs rows, dim and unit_rows ≥ 1 (got {rows}, {dim}, "
                         f"{unit_rows})")
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path}: a store already exists here; pass --overwrite to replace it")
        remove_store(path)
    manifest_info = manifest.info() if isinstance(manifest, Manifest) else dict(manifest)
    if int(manifest_info.get("rows", rows)) != rows:
        raise StoreError(f"{path}: store rows ({rows}) must equal manifest rows "
                         f"({manifest_info['rows']})")
    path.parent.mkdir(parents=True, exist_ok=True)
    unit_rows = min(unit_rows, rows)
    itemsize = np.dtype(dtype).itemsize
    chunk_rows = chunk_rows_for(unit_rows, dim, itemsize)
    attrs = {
        "encoder": {**encoder, "dim": dim},
        "modality": modality,
        "manifest": manifest_attrs(path, manifest_info),
        "alignpipe_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "unit_rows": unit_rows,
        **(extra_attrs or {}),
    }
    group = zarr.open_group(path, mode="w", attributes=attrs)
    group.create_array("latents", shape=(rows, dim), dtype=dtype, chunks=(chunk_rows, dim),
                       shards=(unit_rows, dim), fill_value=0)
    group.create_array("valid", shape=(rows,), dtype="bool", chunks=(unit_rows,),
                       fill_value=False)
    group.create_group(UNITS_GROUP, attributes={
        "about": "one NNNNN.done marker per completed work unit, plus that unit's failures"})
    return LatentStore(path=path, group=group)


def is_store(path: str | Path) -> bool:
    path = Path(path)
    return (path / "zarr.json").exists() and (path / "latents" / "zarr.json").exists()


def open_store(path: str | Path, manifest: Manifest | None = None,
               mode: str = "r") -> LatentStore:
    """Open a store; with `manifest`, also check it was built from exactly that manifest."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not is_store(path):
        raise StoreError(f"{path}: not an alignpipe latent store (no Zarr group with 'latents')")
    try:
        group = zarr.open_group(path, mode=mode)
    except Exception as err:  # zarr raises several types for a damaged group
        raise StoreError(f"{path}: cannot open store: {err}") from None
    store = LatentStore(path=path, group=group)
    for key in ("encoder", "modality", "manifest", "unit_rows"):
        if key not in store.attrs:
            raise StoreError(f"{path}: store attrs lack {key!r}; was it written by alignpipe?")
    if manifest is not None:
        store.check_manifest(manifest)
    return store


def remove_store(path: str | Path) -> None:
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.with_name(path.name + ".failures.parquet").unlink(missing_ok=True)


@contextmanager
def staged_store_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it to `path`, on error delete it.

    For writers that build a whole store in one go (``alignpipe import``): a failure leaves
    nothing half-written behind, and an existing store is only replaced once the new one is done.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: a store already exists here; pass --overwrite to replace it")
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        remove_store(tmp)
        for folder in created:  # innermost first: leave no empty folders we made
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    if path.exists():
        remove_store(path)
    tmp.replace(path)
    staged_failures = tmp.with_name(tmp.name + ".failures.parquet")
    if staged_failures.exists():
        staged_failures.replace(path.with_name(path.name + ".failures.parquet"))
