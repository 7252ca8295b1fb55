"""Never redo finished work, never lose a row: kill -9 + rerun, and dask, equal one clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alignpipe.data.store import open_store
from alignpipe.embed import embed

OPTIONS = {"unit_rows": 40, "batch_size": 8}


def assert_same_store(a: Path, b: Path) -> None:
    left, right = open_store(a), open_store(b)
    np.testing.assert_array_equal(left.latents[:], right.latents[:])  # bit for bit
    np.testing.assert_array_equal(left.read_valid(), right.read_valid())
    assert left.failures() == right.failures()
    assert left.done_units() == right.done_units() == list(range(left.n_units))
    assert {k: v for k, v in left.encoder.items() if k != "weights_path"} == {
        k: v for k, v in right.encoder.items() if k != "weights_path"}


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(toy_copy, tmp_path):
    (toy_copy / "images" / "000" / "000007.jpg").write_bytes(b"not a jpeg")  # a failure too
    manifest = toy_copy / "toy.parquet"
    clean = embed(manifest, "test-vit", tmp_path / "clean", progress=False, **OPTIONS)
    env = {**os.environ, "ALIGNPIPE_EMBED_THROTTLE_S": "0.05"}
    cmd = [sys.executable, "-m", "alignpipe", "embed", str(manifest), "--encoder", "test-vit",
           "--cache", str(tmp_path / "killed"), "--unit-rows", "40", "--batch-size", "8",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = tmp_path / "killed" / "toy" / "test-vit" / "units"
    deadline = time.monotonic() + 120
    while len(list(units.glob("*.done"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never marked 3 units"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(units.glob("*.done")))
    assert proc.returncode == -signal.SIGKILL and 3 <= finished < 15
    resumed = embed(manifest, "test-vit", tmp_path / "killed", progress=False, **OPTIONS)
    assert resumed.skipped_units >= finished
    assert resumed.embedded_rows == (15 - resumed.skipped_units) * 40
    assert_same_store(clean.path, resumed.path)
    assert resumed.failed == clean.failed == 2


def test_store_cut_off_while_being_created_is_recreated(toy_dir, tmp_path):
    path = tmp_path / "cache" / "toy" / "test-vit"
    path.mkdir(parents=True)
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    summary = embed(toy_dir / "toy.parquet", "test-vit", tmp_path / "cache", progress=False)
    assert open_store(summary.path).complete and summary.valid == 600


def test_a_folder_that_is_not_a_store_is_not_deleted(toy_dir, tmp_path):
    from alignpipe.embed import EmbedError

    path = tmp_path / "cache" / "toy" / "test-vit"
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(EmbedError, match="not an alignpipe store"):
        embed(toy_dir / "toy.parquet", "test-vit", tmp_path / "cache", progress=False)
    assert (path / "notes.txt").exists()


def test_dask_local_cluster_gives_the_same_store_as_one_process(toy_copy, tmp_path):
    (toy_copy / "images" / "000" / "000012.png").unlink()
    manifest = toy_copy / "toy.parquet"
    options = {"unit_rows": 100, "batch_size": 16, "workers": 1, "progress": False}
    single = embed(manifest, "test-vit", tmp_path / "single", **options)
    multi = embed(manifest, "test-vit", tmp_path / "dask", cluster="local:2", **options)
    assert (multi.units, multi.embedded_rows, multi.failed) == (6, 600, 2)
    assert_same_store(single.path, multi.path)
    again = embed(manifest, "test-vit", tmp_path / "dask", cluster="local:2", **options)
    assert again.skipped_units == 6 and again.embedded_rows == 0


def test_cluster_options_are_checked_before_any_work(toy_dir, tmp_path):
    from alignpipe.embed import EmbedError
    from alignpipe.embed.cluster import ClusterError

    with pytest.raises(ClusterError, match="use local:N"):
        embed(toy_dir / "toy.parquet", "test-vit", tmp_path, cluster="gpus:2", progress=False)
    with pytest.raises(EmbedError, match="not both"):
        embed(toy_dir / "toy.parquet", "test-vit", tmp_path, cluster="local:2",
              scheduler="tcp://127.0.0.1:8786", progress=False)
    assert not (tmp_path / "toy").exists()
