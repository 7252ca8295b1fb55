"""Curation as dask tasks: one task per pool shard, then a pairwise tree reduction of the
per-shard top-N on the workers (the same merge as one process, so the same selection).

``--cluster local:N`` starts a LocalCluster, ``--scheduler ADDR`` joins a running one; the
stores (and the partial-results folder) must be at the same path on every worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from alignpipe.curate.topk import TopN, merge
from alignpipe.embed.cluster import TASK_RETRIES, ClusterError, connect

if TYPE_CHECKING:
    from distributed import Client

    from alignpipe.curate import ShardJob
    from alignpipe.data.store import LatentStore


def shard_task(job: ShardJob, unit: int) -> TopN:
    return job.run(unit)


def merge_task(a: TopN, b: TopN, n: int) -> TopN:
    return merge(a, b, n)


def run_on_dask(job: ShardJob, units: list[int], *, cluster: str | None,
                scheduler: str | None, on_shard: Callable[[int], None] | None = None,
                store: LatentStore | None = None, client: Client | None = None) -> TopN:
    """The per-shard tasks and their tree reduction; `client` reuses a connected dask Client."""
    if client is not None:
        return _run(client, job, units, on_shard, store, False)
    with connect(cluster, scheduler) as (connected, gpu):
        return _run(connected, job, units, on_shard, store, gpu)


def _run(client: Client, job: ShardJob, units: list[int],
         on_shard: Callable[[int], None] | None, store: LatentStore | None,
         gpu: bool) -> TopN:
    from distributed import as_completed

    resources = {"GPU": 1} if gpu else None
    token = uuid.uuid4().hex[:8]
    [scattered] = client.scatter([job], broadcast=True)
    futures = {client.submit(shard_task, scattered, unit, key=f"curate-{token}-{unit:05d}",
                             pure=False, retries=TASK_RETRIES, resources=resources): unit
               for unit in units}
    level = list(futures)
    errors = []
    if on_shard is not None:
        for future in as_completed(list(futures)):
            if future.status == "error":
                errors.append(f"shard {futures[future]}: {future.exception()}")
            elif store is not None:
                start, stop = store.unit_range(futures[future])
                on_shard(stop - start)
    if errors:
        raise ClusterError(f"{len(errors)} shard(s) failed on the cluster: "
                           f"{'; '.join(errors[:5])}; finished shards are kept, rerun to retry")
    if not level:
        return TopN.empty(job.vectors.shape[0])
    depth = 0
    while len(level) > 1:  # pairwise: the reduction is a balanced tree over the shard order
        depth += 1
        level = [client.submit(merge_task, level[i], level[i + 1], job.per_concept,
                               key=f"curate-{token}-merge{depth}-{i:05d}", pure=False)
                 if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    try:
        return level[0].result()
    except Exception as err:  # a task's own error, raised on the driver
        if isinstance(err, ClusterError):
            raise
        raise ClusterError(f"curation failed on the cluster: {err}") from err
