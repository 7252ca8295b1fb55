"""`alignpipe bench curate`: curation rows/s and peak memory against a brute-force reference.

The reference is what a script does without alignpipe: read the whole pool, one full
pool × concepts similarity matrix in numpy, an argsort per concept, take the top N. alignpipe's
`curate` reads the pool store shard by shard and keeps a running top-N per concept (memory
concepts × N). Both run on the same pool store, each in a fresh process, and should give the
same selection (the rows in only one of them are counted); each is timed on its second run
(the first warms up imports and kernels). Peak
memory is the resident set (sampled every 2 ms) above what the process held before that run;
alignpipe's is also shown at a quarter of the pool, to show it does not grow with the pool.
Memory the allocator kept from the warm-up run is not counted again, so both peaks are lower
bounds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from alignpipe.app.synthetic import write_store
from alignpipe.data.manifest import write_manifest

_CHILD = """
import json, sys, threading, time
import numpy as np
import torch
from pathlib import Path
from alignpipe.app.benchmarks.curate import brute_force
from alignpipe.curate import curate
kind, pool, concepts, n, device, out = sys.argv[1:7]
def run():
    if kind == "ours":
        return curate(pool, [concepts], per_concept=int(n), device=device or None).selection.rows
    return brute_force(Path(pool), Path(concepts), int(n))
run()  # warm-up: imports, kernels, the allocator's first growth
def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096
before, top, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        top[0] = max(top[0], rss())
        time.sleep(0.002)
watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
began = time.perf_counter()
rows = run()
seconds = time.perf_counter() - began
done.set()
watcher.join()
peak = max(top[0], rss())
np.save(out, np.sort(rows))
print(json.dumps({"seconds": seconds, "peak": peak, "before": before}))
"""


def measure(kind: str, pool: Path, concepts: Path, n: int, device: str | None,
            out: Path) -> tuple[np.ndarray, float, int]:
    """(selected rows, seconds, peak resident bytes above the warmed-up process) of one run in
    a fresh process: each method's peak is its own, not the allocator's leftovers of another."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CHILD, kind, str(pool), str(concepts),
                           str(n), device or "", str(out)],
                          capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"bench curate ({kind}) failed:\n{done.stderr[-2000:]}")
    value = json.loads(done.stdout.strip().splitlines()[-1])
    return np.load(out), value["seconds"], max(0, value["peak"] - value["before"])


def make_pool(folder: Path, rows: int, concepts: int, dim: int, seed: int = 0,
              templates: int = 2) -> tuple[Path, Path]:
    """A pool store of `rows` clustered latents and a concept store of `concepts` classes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((concepts, dim)).astype(np.float32)
    pool_manifest = write_manifest(pa.table({"id": [f"p{i}" for i in range(rows)],
                                             "text": [f"caption {i}" for i in range(rows)]}),
                                   folder / "pool.parquet")
    latents = np.empty((rows, dim), dtype=np.float32)
    step = 1 << 16
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        which = rng.integers(concepts, size=stop - start)
        latents[start:stop] = centres[which] + 2.0 * rng.standard_normal((stop - start, dim))
    pool = write_store(folder / "cache" / "pool" / "bench", latents, "text", "bench",
                       pool_manifest)
    del latents
    prompts = write_manifest(pa.table({
        "id": [f"c{c}t{t}" for c in range(concepts) for t in range(templates)],
        "text": [f"t{t} c{c}" for c in range(concepts) for t in range(templates)],
        "label": [f"class {c}" for c in range(concepts) for _ in range(templates)]}),
        folder / "prompts.parquet")
    prompt_latents = np.repeat(centres, templates, 0) + 0.3 * rng.standard_normal(
        (concepts * templates, dim)).astype(np.float32)
    concept_store = write_store(folder / "cache" / "prompts" / "bench", prompt_latents, "text",
                                "bench", prompts)
    return pool.path, concept_store.path


def brute_force(pool: Path, concept_store: Path, n: int) -> np.ndarray:
    """Full similarity matrix, argsort per concept, union by best concept: the selected rows."""
    from alignpipe.curate.concepts import normalise, store_concepts
    from alignpipe.data.store import open_store

    store = open_store(pool)
    x = normalise(store.read())
    valid = store.read_valid()
    _, _, concepts = store_concepts(open_store(concept_store))
    sims = x @ concepts.T                                       # rows × concepts
    sims[~valid] = -np.inf
    chosen = []
    for c in range(sims.shape[1]):
        order = np.argsort(-sims[:, c], kind="stable")[:n]
        chosen.append(order[np.isfinite(sims[order, c])])
    return np.unique(np.concatenate(chosen))


def run_curate_bench(rows: int = 200_000, concepts: int = 1000, dim: int = 256,
                     per_concept: int = 100, device: str | None = None,
                     quick: bool = False) -> list[dict]:
    """One table of rows/s and peak memory, alignpipe vs the reference, with their ratios."""

    if quick:
        rows, concepts = min(rows, 40_000), min(concepts, 200)
    with tempfile.TemporaryDirectory(prefix="alignpipe-bench-curate-") as tmp:
        folder = Path(tmp)
        pool, concept_store = make_pool(folder / "full", rows, concepts, dim)
        small_pool, small_concepts = make_pool(folder / "quarter", rows // 4, concepts, dim)

        _, _, small_peak = measure("ours", small_pool, small_concepts, per_concept, device,
                                   folder / "small.npy")
        mine, our_s, our_peak = measure("ours", pool, concept_store, per_concept, device,
                                        folder / "ours.npy")
        ref, ref_s, ref_peak = measure("brute", pool, concept_store, per_concept, device,
                                       folder / "brute.npy")
    # float32 sums in another order (torch per block vs one numpy matmul) can swap two rows
    # whose scores tie to ~1e-7 at a concept's N-th place: count them rather than hide them
    differ = int(np.setxor1d(mine, ref).size)
    size = f"{rows:,} rows × {concepts:,} concepts, dim {dim}, N {per_concept}"
    return [
        {"name": f"curate ({size})", "value": rows / our_s, "unit": "rows/s"},
        {"name": "brute-force numpy (full matrix + argsort)", "value": rows / ref_s,
         "unit": "rows/s"},
        {"name": "curate / brute force", "value": ref_s / our_s, "unit": "×"},
        {"name": "curate peak memory", "value": our_peak / 2**20, "unit": "MiB"},
        {"name": f"curate peak memory at {rows // 4:,} rows", "value": small_peak / 2**20,
         "unit": "MiB"},
        {"name": "brute-force peak memory", "value": ref_peak / 2**20, "unit": "MiB"},
        {"name": "brute-force / curate memory", "value": ref_peak / max(our_peak, 1),
         "unit": "×"},
        {"name": f"rows in only one of the two selections (of {ref.size:,})",
         "value": differ, "unit": "rows"},
    ]


if __name__ == "__main__":
    from rich.console import Console

    from alignpipe.app.report import bench_table

    Console().print(bench_table([{"bench": "curate", **r} for r in run_curate_bench()]))
