"""`alignpipe bench search`: exact store search vs the approximate index, queries/s and recall.

One store of clustered random latents (centres plus Gaussian noise, so neighbours exist as in a
real encoder's space) and a random linear head stand in for a run. Both searches go through
`search_encoded`, one query per call as `alignpipe search` makes them: exact search reads and
projects every row per call, the index (built once, timed apart) looks up its graph; each call
also opens and checks the store and its manifest, which both pay. Both are also timed with all
queries in one call (exact search's best case). Recall@10 is the index's top 10 against exact
search's, on every query.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from alignpipe.app.synthetic import write_store
from alignpipe.data.manifest import write_manifest
from alignpipe.data.store import LatentStore
from alignpipe.fit.config import resolve_config
from alignpipe.methods import create_method
from alignpipe.model.aligned import AlignedModel, Side
from alignpipe.model.index import index_path
from alignpipe.model.search import search_encoded

K = 10


def make_store(folder: Path, rows: int, dim: int, clusters: int, seed: int = 0) -> LatentStore:
    """`rows` text latents around `clusters` random centres, written a block at a time."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    manifest = write_manifest(pa.table({"id": [f"r{i}" for i in range(rows)],
                                        "text": [f"caption {i}" for i in range(rows)]}),
                              folder / "bench.parquet")
    latents = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 1 << 16):
        stop = min(rows, start + (1 << 16))
        latents[start:stop] = centres[rng.integers(clusters, size=stop - start)] + \
            0.5 * rng.standard_normal((stop - start, dim)).astype(np.float32)
    return write_store(folder / "cache" / "bench" / "rand", latents, "text", "bench", manifest)


def random_model(store: LatentStore, out_dim: int, seed: int = 0) -> AlignedModel:
    """A linear head of random weights from the store's latents to `out_dim` (image side
    unused)."""
    torch.manual_seed(seed)
    config = resolve_config("linear", {"out_dim": out_dim, "standardize": False})
    method = create_method("linear", config, store.dim, store.dim)
    sides = {"a": Side("a", "image", {"name": "unused", "dim": store.dim}),
             "b": Side("b", "text", store.encoder)}
    return AlignedModel(method.train(False), sides, name="bench", method_name="linear",
                        device=torch.device("cpu"))


def _queries(model: AlignedModel, store: LatentStore, n: int, seed: int = 1) -> torch.Tensor:
    """Stored rows plus noise, in the shared space: queries with true near neighbours."""
    rng = np.random.default_rng(seed)
    picked = store.read(np.sort(rng.choice(store.rows, size=n, replace=False)))
    noisy = picked + 0.5 * rng.standard_normal(picked.shape).astype(np.float32)
    with torch.inference_mode():
        return model.encode_latents("text", noisy).float()


def _per_query(model: AlignedModel, store: LatentStore, query: torch.Tensor,
               index: bool) -> tuple[list[list[int]], float]:
    began = time.perf_counter()
    rows = [[h.row for h in search_encoded(model, store, query[i:i + 1], k=K, index=index)[0]]
            for i in range(query.shape[0])]
    return rows, time.perf_counter() - began


def _batched(model: AlignedModel, store: LatentStore, query: torch.Tensor,
             index: bool) -> tuple[list[list[int]], float]:
    began = time.perf_counter()
    hits = search_encoded(model, store, query, k=K, index=index)
    return [[h.row for h in one] for one in hits], time.perf_counter() - began


def run_search_bench(rows: int = 200_000, dim: int = 384, out_dim: int = 256,
                     queries: int = 200, clusters: int = 2000,
                     quick: bool = False) -> list[dict]:
    """Queries/s of exact search and of the index, their ratio, build time and recall@10."""
    if quick:
        rows, queries = min(rows, 20_000), min(queries, 50)
    exact_calls = min(queries, 5)  # each reads the whole store: a few calls measure it
    with tempfile.TemporaryDirectory(prefix="alignpipe-bench-search-") as tmp:
        store = make_store(Path(tmp), rows, dim, clusters)
        model = random_model(store, out_dim)
        query = _queries(model, store, queries)
        search_encoded(model, store, query[:1], k=K)  # warm-up: imports, kernels
        truth, exact_batch_s = _batched(model, store, query, index=False)
        _, exact_s = _per_query(model, store, query[:exact_calls], index=False)
        began = time.perf_counter()
        search_encoded(model, store, query[:1], k=K, index=True)  # builds and saves it
        build_s = time.perf_counter() - began
        size = index_path(store, model).stat().st_size
        found, index_s = _per_query(model, store, query, index=True)
        _, index_batch_s = _batched(model, store, query, index=True)
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth,
                                                                      strict=True)]))
    exact_qps, index_qps = exact_calls / exact_s, queries / index_s
    size_note = f"{rows:,} rows, dim {dim} → {out_dim}, k {K}"
    return [
        {"name": f"exact, 1 query per call ({size_note})", "value": exact_qps,
         "unit": "queries/s"},
        {"name": "index, 1 query per call", "value": index_qps, "unit": "queries/s"},
        {"name": "index / exact, 1 query per call", "value": index_qps / exact_qps, "unit": "×"},
        {"name": f"exact, {queries} queries in one call", "value": queries / exact_batch_s,
         "unit": "queries/s"},
        {"name": f"index, {queries} queries in one call", "value": queries / index_batch_s,
         "unit": "queries/s"},
        {"name": f"index / exact, {queries} queries in one call",
         "value": exact_batch_s / index_batch_s, "unit": "×"},
        {"name": "index build (once, cached beside the store)", "value": build_s, "unit": "s"},
        {"name": "index file", "value": size / 2**20, "unit": "MiB"},
        {"name": f"recall@{K} of the index against exact search", "value": recall, "unit": ""},
    ]

if __name__ == "__main__":
    from rich.console import Console

    from alignpipe.app.report import bench_table

    Console().print(bench_table([{"bench": "search", **r} for r in run_search_bench()]))
