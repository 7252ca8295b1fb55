"""Work units as dask tasks: ``--cluster local:N`` starts a LocalCluster, ``--scheduler ADDR``
joins a running one.

Each unit is one task that only carries the plain `Job` and the unit number; the worker loads
the encoder once per process (`runner.job_encoder`'s cache) and writes the unit's shard and
marker itself, so the store must be on a filesystem every worker sees. A task is idempotent (a
finished unit returns at once) and retried on failure; a unit owns its shard, so no two writers
ever share one. With GPUs, each worker gets one: a LocalCluster worker uses GPU
``name % count``; workers started by hand should each see one GPU (CUDA_VISIBLE_DEVICES) and
advertise ``--resources GPU=1``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from alignpipe.data.store import LatentStore
from alignpipe.embed.engine import UnitStats
from alignpipe.embed.runner import (
    Job,
    Outcome,
    describe,
    ensure_store,
    job_encoder,
    job_manifest,
    progress_bar,
    run_units,
)
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from alignpipe.embed.api import Request

TASK_RETRIES = 2


class ClusterError(AlignpipeError):
    """The dask cluster cannot be started or reached, or work units failed on it."""


def worker_device(job: Job) -> str:
    """This worker's device: the job's, else one GPU per worker, else the CPU."""
    import torch

    if job.device not in (None, "auto"):
        return job.device
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda:0"
    from distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else sum(str(name).encode())
    return f"cuda:{index % count}"


def describe_task(job: Job, identity: dict) -> tuple[int, str, dict]:
    """Load the encoder on a worker (it stays cached there) and report its dim and provenance."""
    encoder = job_encoder(job, worker_device(job))
    return encoder.dim, encoder.modality, describe(job, encoder, identity)


def unit_task(job: Job, unit: int) -> dict:
    """One work unit; a unit already marked done returns at once, so retries are harmless."""
    stats = run_units(job, [unit], device=worker_device(job))
    return stats.__dict__


def parse_cluster(spec: str) -> int:
    kind, _, count = spec.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise ClusterError(f"--cluster {spec!r}: use local:N (N workers on this machine), or "
                           f"--scheduler tcp://HOST:PORT to join a running cluster")
    return int(count)


@contextmanager
def connect(cluster: str | None, scheduler: str | None) -> Iterator[tuple[object, bool]]:
    """A dask Client, and whether tasks should ask for a GPU resource."""
    import dask
    import torch
    from distributed import Client, LocalCluster

    if cluster:
        n = parse_cluster(cluster)
        gpus = torch.cuda.device_count()
        resources = {"GPU": 1} if gpus else None
        # Non-daemonic workers may fork decode processes of their own.
        with dask.config.set({"distributed.worker.daemon": False}), LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                resources=resources) as local:
            with Client(local) as client:
                yield client, bool(gpus)
        return
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as err:
        raise ClusterError(f"--scheduler {scheduler}: cannot reach the dask scheduler "
                           f"({err})") from None
    with client:
        workers = client.scheduler_info().get("workers", {}).values()
        yield client, bool(workers) and all("GPU" in w.get("resources", {}) for w in workers)


def run_on_dask(job: Job, request: Request, store: LatentStore | None, *, unit_rows: int,
                cluster: str | None, scheduler: str | None, progress: bool) -> Outcome:
    from distributed import as_completed

    manifest = job_manifest(job)
    with connect(cluster, scheduler) as (client, gpu):
        resources = {"GPU": 1} if gpu else None
        if store is None:  # the first task also warms that worker's encoder cache
            dim, modality, provenance = client.submit(
                describe_task, job, request.identity(), pure=False, resources=resources,
                retries=TASK_RETRIES).result()
            store = ensure_store(job, store, dim, modality, provenance, manifest,
                                 request.latent_dtype, unit_rows)
        pending = store.pending_units()
        skipped = store.n_units - len(pending)
        token = uuid.uuid4().hex[:8]
        stats, errors = UnitStats(), []
        with progress_bar(job, store, skipped, progress) as advance:
            began = time.perf_counter()
            futures = {client.submit(unit_task, job, unit, key=f"embed-{token}-{unit:05d}",
                                     pure=False, retries=TASK_RETRIES, resources=resources):
                       unit for unit in pending}
            for future in as_completed(futures):
                unit = futures[future]
                if future.status == "error":
                    errors.append(f"unit {unit}: {future.exception()}")
                    continue
                stats.add(future.result())
                if advance:
                    start, stop = store.unit_range(unit)
                    advance(stop - start)
            seconds = time.perf_counter() - began
    if errors:
        raise ClusterError(f"{len(errors)} work unit(s) failed on the cluster after "
                           f"{TASK_RETRIES} retries: {'; '.join(errors[:5])}; finished units are "
                           f"kept, rerun the same command to retry the rest")
    return Outcome(store, stats, skipped, seconds)
