"""Streaming: peak memory of an embed run is flat in the number of rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from alignpipe.app.toy import _scene, caption
from alignpipe.data.manifest import write_manifest

PEAK_RSS = """
import resource, sys
from alignpipe.embed import embed
embed(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def text_manifest(path, rows: int):
    rng = np.random.default_rng(0)
    texts = [f"{caption(_scene(rng, i), rng)} #{i}" for i in range(rows)]
    return write_manifest(pa.table({"id": [f"r{i}" for i in range(rows)], "text": texts}), path)


def peak_kb(manifest, encoder: str, cache) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(manifest), encoder, str(cache)],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_of_100k_rows_is_within_10_percent_of_10k(tmp_path):
    small = peak_kb(text_manifest(tmp_path / "a.parquet", 10_000), "test-text", tmp_path / "c")
    large = peak_kb(text_manifest(tmp_path / "b.parquet", 100_000), "test-text", tmp_path / "c")
    assert large <= 1.10 * small, (small, large)
