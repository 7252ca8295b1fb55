"""Carrying out an embed job: create the store once, then run its pending work units here or on a
dask cluster. A `Job` is plain data; processes that run units load the encoder from it
themselves (once per process), so no model ever travels through a task graph.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from alignpipe.data.manifest import Manifest, read_manifest
from alignpipe.data.store import LatentStore, create_store, open_store
from alignpipe.embed.decoders import close_pools
from alignpipe.embed.engine import UnitRunner, UnitStats
from alignpipe.encoders import Encoder, load_encoder
from alignpipe.encoders.base import resolve_device, resolve_dtype
from alignpipe.util.errors import StoreError
from alignpipe.util.fsutil import os_errors
from alignpipe.util.progress import progress_bar as rich_progress

if TYPE_CHECKING:
    import torch

    from alignpipe.embed.api import Request


@dataclass(frozen=True)
class Job:
    """Everything a process needs to run units of one store."""

    manifest: str
    manifest_sha256: str
    store: str
    encoder: str
    column: str
    modality: str | None
    weights: str | None
    image_size: int | None
    pooling: str | None
    device: str | None
    dtype: str | None
    batch_size: int
    workers: int
    decode_timeout: float

    def encoder_key(self, device: str | None) -> tuple:
        return (self.encoder, self.weights, self.image_size, self.pooling, self.modality, device)


@dataclass
class Outcome:
    store: LatentStore
    stats: UnitStats
    skipped: int
    seconds: float


# ---- per-process caches: one encoder and one manifest per process, however many units -----------
_ENCODERS: dict[tuple, Encoder] = {}
_MANIFESTS: dict[str, Manifest] = {}
_CACHE_LOCK = threading.Lock()


def job_encoder(job: Job, device: str | None = None) -> Encoder:
    device = device if device is not None else job.device
    key = job.encoder_key(str(resolve_device(device)))
    with _CACHE_LOCK:
        if key not in _ENCODERS:
            close_pools()  # their workers were forked with the last encoder's preprocessing
            _ENCODERS.clear()  # a process serves one encoder at a time; free the last one
            _ENCODERS[key] = load_encoder(job.encoder, weights=job.weights,
                                          image_size=job.image_size, pooling=job.pooling,
                                          device=device, modality=job.modality)
        return _ENCODERS[key]


def clear_encoder_cache() -> None:
    """Drop the cached encoder (kept so that consecutive embeds of one model load it once)."""
    with _CACHE_LOCK:
        close_pools()
        _ENCODERS.clear()


def remember_manifest(job: Job, manifest: Manifest) -> None:
    """Seed this process's cache with the manifest the caller has just read and hashed, so
    it is not read and hashed again; its path is made absolute like a re-read's would be."""
    with _CACHE_LOCK:
        _MANIFESTS[job.manifest] = replace(manifest, path=Path(job.manifest))


def job_manifest(job: Job) -> Manifest:
    with _CACHE_LOCK:
        manifest = _MANIFESTS.get(job.manifest)
        if manifest is None or manifest.sha256 != job.manifest_sha256:
            manifest = read_manifest(job.manifest)
            _MANIFESTS[job.manifest] = manifest
    if manifest.sha256 != job.manifest_sha256:
        raise StoreError(f"{job.manifest} changed while it was being embedded (sha256 "
                         f"{manifest.sha256[:12]}…, expected {job.manifest_sha256[:12]}…)")
    return manifest


def describe(job: Job, encoder: Encoder, identity: dict) -> dict:
    """The store's ``encoder`` attr: provenance plus the identity a rerun must match."""
    dtype = resolve_dtype(job.dtype, encoder.device)
    return {"name": job.encoder, **encoder.describe(), "modality": encoder.modality,
            "column": job.column, "compute_dtype": str(dtype).removeprefix("torch."),
            "request": {**identity, "batch_size": job.batch_size}}


def ensure_store(job: Job, store: LatentStore | None, dim: int, modality: str,
                 provenance: dict, manifest: Manifest, latent_dtype: str,
                 unit_rows: int) -> LatentStore:
    if store is None:  # nothing there, a creation cut off by a kill, or --overwrite
        with os_errors(job.store):  # a full disk or read-only cache: one line naming it
            return create_store(job.store, rows=manifest.rows, dim=dim, encoder=provenance,
                                modality=modality, manifest=manifest, dtype=latent_dtype,
                                unit_rows=unit_rows, overwrite=True)
    if store.dim != dim:
        raise StoreError(f"{store.path}: store latents are {store.dim}-d but {job.encoder} "
                         f"gives {dim}-d; pass --overwrite to rebuild it")
    return store


def run_units(job: Job, units: list[int], device: str | None = None,
              progress: Callable[[int], None] | None = None) -> UnitStats:
    """Run `units` of the job's store in this process (the unit of work of every executor)."""
    encoder = job_encoder(job, device)
    store = open_store(job.store, mode="r+")
    dtype = resolve_dtype(job.dtype, encoder.device)
    _check_compute_dtype(store, dtype, encoder)
    runner = UnitRunner(encoder, job_manifest(job), store, job.column,
                        batch_size=job.batch_size, workers=job.workers, dtype=dtype,
                        decode_timeout=job.decode_timeout)
    return runner.run([u for u in units if not store.is_done(u)], progress)


def _check_compute_dtype(store: LatentStore, dtype: torch.dtype, encoder: Encoder) -> None:
    """A store is computed in one dtype: resuming a bfloat16 run in float32 (another device,
    another --dtype) would mix latents that differ by ~1e-2 in one store."""
    started = store.encoder.get("compute_dtype")
    now = str(dtype).removeprefix("torch.")
    if started and started != now:
        raise StoreError(f"{store.path} was computed in {started}; this run would compute in "
                         f"{now} (on {encoder.device.type}); pass --dtype {started} to resume "
                         f"it, or --overwrite to start again")


def run_job(job: Job, request: Request, store: LatentStore | None, *, unit_rows: int,
            progress: bool) -> Outcome:
    """Run the whole job in this process (`cluster.run_on_dask` is the dask executor)."""
    if store is not None and store.complete:  # nothing to do: no model load
        return Outcome(store, UnitStats(), store.n_units, 0.0)
    manifest = job_manifest(job)
    encoder = job_encoder(job)
    store = ensure_store(job, store, encoder.dim, encoder.modality,
                         describe(job, encoder, request.identity()), manifest,
                         request.latent_dtype, unit_rows)
    pending = store.pending_units()
    skipped = store.n_units - len(pending)
    with progress_bar(job, store, skipped, progress) as advance:
        began = time.perf_counter()
        try:
            stats = run_units(job, pending, progress=advance)
        finally:
            # Here one call ran every unit; the pool is kept between calls only in dask
            # workers, whose tasks come one unit at a time.
            close_pools()
        seconds = time.perf_counter() - began
    return Outcome(store, stats, skipped, seconds)


# ---- progress -----------------------------------------------------------------------------------
@contextmanager
def progress_bar(job: Job, store: LatentStore, skipped: int,
                 enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich bar over rows with rows/s and ETA; finished units count as done from the start."""
    if not enabled:
        yield None
        return
    done_rows = sum(stop - start for start, stop in map(store.unit_range, store.done_units()))
    note = f" ({skipped} units already done)" if skipped else ""
    with rich_progress(description="[bold]{task.description}", speed_unit="rows",
                       stderr=True) as bar:
        task = bar.add_task(f"embed {job.encoder}{note}", total=store.rows, completed=done_rows)
        yield lambda rows: bar.advance(task, rows)

