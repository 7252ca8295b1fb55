"""Benchmarks that print ratios measured in one run (never timed tests).

`alignpipe bench embed` and `alignpipe bench fit` run one each; `alignpipe bench all`
(`make bench`) runs both and prints one table.
"""

from __future__ import annotations


def run_all(device: str | None = None, quick: bool = False) -> list[dict]:
    from alignpipe.app.benchmarks.embed import run_embed_bench
    from alignpipe.app.benchmarks.fit import run_fit_bench

    rows = [{"bench": "embed", **row} for row in run_embed_bench(device=device, quick=quick)]
    rows += [{"bench": "fit", **row} for row in run_fit_bench(device=device, quick=quick)]
    return rows
