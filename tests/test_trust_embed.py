"""Issue 8, stage one: no leaked threads or pools, final timeouts, full disks, one writer per
store, resumes that equal an uninterrupted run, columns of the encoder's modality, dataset names
that stay inside the cache."""

from __future__ import annotations

import errno
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data.store import lock_store, open_store, store_path
from alignpipe.embed import EmbedError, embed, embed_status
from alignpipe.util.errors import StoreError
from alignpipe.util.fsutil import LockedError

_EARLIER: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _earlier_threads():
    """Threads earlier tests left on purpose (a decoder hung for 60 s cannot be stopped)."""
    _EARLIER.clear()
    _EARLIER.update(threading.enumerate())


def alignpipe_threads() -> list[str]:
    """alignpipe threads started by this test and still alive."""
    return [t.name for t in threading.enumerate()
            if t.name.startswith("alignpipe") and t not in _EARLIER]


def alignpipe_children() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("alignpipe")]


def same_store(a: Path, b: Path) -> None:
    left, right = open_store(a), open_store(b)
    np.testing.assert_array_equal(left.latents[:], right.latents[:])  # bit for bit
    np.testing.assert_array_equal(left.read_valid(), right.read_valid())
    assert left.failures() == right.failures()
    assert left.done_units() == right.done_units() == list(range(left.n_units))


def unmark(path: Path, units: list[int]) -> None:
    """What a kill leaves: these units never got their completion marker."""
    for unit in units:
        (path / "units" / f"{unit:05d}.done").unlink()


# ---- 13: threads and pools -----------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["threads", "processes"])
def test_a_consumer_that_raises_leaves_no_thread_or_worker_behind(toy_dir, tmp_path,
                                                                  monkeypatch, decoder):
    from alignpipe.embed.engine import UnitRunner

    monkeypatch.setenv("ALIGNPIPE_DECODER", decoder)
    real, calls = UnitRunner._launch, []

    def launch(self, batch):
        calls.append(batch.plan.unit)
        if len(calls) == 8:  # mid-way through unit 1 (5 batches a unit), unit 0 written
            raise RuntimeError("device lost")
        return real(self, batch)

    monkeypatch.setattr(UnitRunner, "_launch", launch)
    with pytest.raises(RuntimeError, match="device lost"):
        embed(toy_dir / "toy.parquet", "test-vit", tmp_path, progress=False, unit_rows=100,
              batch_size=10, workers=2)
    assert alignpipe_threads() == []  # the writer used to block on its queue forever
    assert alignpipe_children() == []
    assert open_store(store_path(tmp_path, "toy", "test-vit")).done_units() == [0]


def test_a_decoder_that_returns_after_its_timeout_keeps_the_timeout():
    from alignpipe.embed.decode_threads import DecodePool

    def slow(value):
        time.sleep(0.6)
        return value

    pool = DecodePool(slow, workers=2, timeout=0.2)
    outcomes = pool.map(["a.jpg", "b.jpg"], window=4)
    first = next(outcomes)  # both items are given up on together, at ~0.2 s
    time.sleep(0.8)  # meanwhile b's decoder returns, after its deadline
    second = next(outcomes)
    pool.close()
    for outcome, name in ((first, "a.jpg"), (second, "b.jpg")):
        assert not outcome.ok and outcome.value is None
        assert outcome.reason.startswith(f"decoding {name} took longer than 0.2 s")


def test_a_hung_workers_late_result_does_not_undo_its_timeout():
    from alignpipe.embed.decode_processes import ProcessPool

    pool = ProcessPool(lambda value: torch.zeros(2), lambda items: {"x": torch.stack(items)},
                       workers=1, timeout=30)
    try:
        task_id = pool.submit([(0, "a.jpg"), (1, "b.jpg")])
        task = pool.open[task_id]
        pool._resend(task, 0, "decoding took longer than 30 s")  # as _check_workers does
        # The killed worker had sent its whole chunk just before it was killed:
        pool._receive((task_id, 0, [0, 1], {"x": torch.zeros(2, 2)}, []))
        assert not task.done
        done = pool.result(task_id)  # the resent rest of the chunk
        assert done.ok == [1] and done.failed == [(0, "decoding took longer than 30 s: a.jpg")]
        assert pool.submit([(0, "c.jpg")]) != task_id  # ids are never reused
    finally:
        pool.close()


@pytest.mark.parametrize("decoder,kind", [("processes", "ProcessPool"),
                                          ("threads", "DecodePool")])
def test_one_decode_pool_serves_every_task_of_a_process(toy_dir, tmp_path, monkeypatch,
                                                        decoder, kind):
    from alignpipe.embed import decoders
    from alignpipe.embed.runner import Job, clear_encoder_cache, run_units

    monkeypatch.setenv("ALIGNPIPE_DECODER", decoder)
    made = []
    real = getattr(decoders, kind)

    class Counted(real):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(decoders, kind, Counted)
    manifest = toy_dir / "toy.parquet"
    summary = embed(manifest, "test-vit", tmp_path, progress=False, unit_rows=150,
                    batch_size=16, workers=2)
    made.clear()
    unmark(summary.path, [1, 2, 3])
    from alignpipe.data.manifest import file_sha256

    job = Job(manifest=str(manifest), manifest_sha256=file_sha256(manifest),
              store=str(summary.path), encoder="test-vit", column="image", modality="image",
              weights=None, image_size=None, pooling=None, device="cpu", dtype=None,
              batch_size=16, workers=2, decode_timeout=30.0)
    try:
        for unit in (1, 2, 3):  # three dask tasks on one worker
            assert run_units(job, [unit], device="cpu").units == 1
        assert len(made) == 1 and not made[0].closed
    finally:
        clear_encoder_cache()  # also closes the process's pools
    assert made[0].closed and alignpipe_children() == []
    assert open_store(summary.path).complete


# ---- 17: full disk -------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_the_same_command_then_finishes(toy_copy, tmp_path,
                                                                     monkeypatch):
    import alignpipe.data.store as store_module

    (toy_copy / "images" / "000" / "000003.jpg").write_bytes(b"not a jpeg")  # a failure too
    manifest = toy_copy / "toy.parquet"
    clean = embed(manifest, "test-vit", tmp_path / "clean", progress=False, unit_rows=150,
                  batch_size=16)
    real = store_module.write_failures

    def full_disk(path, failures):
        if Path(path).name.startswith("00002."):
            raise OSError(errno.ENOSPC, "No space left on device")  # as zarr raises it
        return real(path, failures)

    monkeypatch.setattr(store_module, "write_failures", full_disk)
    args = ["embed", str(manifest), "--encoder", "test-vit", "--cache", str(tmp_path / "c"),
            "--unit-rows", "150", "--batch-size", "16", "--no-progress"]
    failed = CliRunner().invoke(app, args)
    path = store_path(tmp_path / "c", "toy", "test-vit").resolve()
    assert failed.exit_code not in (0, 1), failed.output  # 1 would be an unhandled exception
    lines = [line for line in failed.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: no space left"), lines
    assert alignpipe_threads() == [] and alignpipe_children() == []
    assert open_store(path).done_units() == [0, 1]
    monkeypatch.setattr(store_module, "write_failures", real)  # space freed
    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0 and "2 skipped" in resumed.output, resumed.output
    same_store(clean.path, path)


def test_a_full_dev_shm_is_one_line_not_a_hang(toy_dir, tmp_path, monkeypatch):
    from alignpipe.util.fsutil import DiskError

    def full(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_0>: "
                           "No space left on device (28)")

    monkeypatch.setenv("ALIGNPIPE_DECODER", "processes")
    monkeypatch.setattr(torch.Tensor, "share_memory_", full)  # inherited by forked workers
    began = time.monotonic()
    with pytest.raises(DiskError, match="^/dev/shm: no space left .* fewer --workers"):
        embed(toy_dir / "toy.parquet", "test-vit", tmp_path, progress=False, workers=2)
    assert time.monotonic() - began < 20  # the batch was lost in a feeder thread: a hang
    assert alignpipe_threads() == [] and alignpipe_children() == []


# ---- 20: one writer per store; resumes keep the batch size and compute dtype -------------------
def test_a_second_embed_of_one_store_is_refused_while_the_first_runs(toy_dir, tmp_path):
    path = store_path(tmp_path, "toy", "test-vit").resolve()
    args = ["embed", str(toy_dir / "toy.parquet"), "--encoder", "test-vit", "--cache",
            str(tmp_path), "--latent-dtype", "float32", "--no-progress"]
    with lock_store(path):  # the first embed, still creating the float16 store
        second = CliRunner().invoke(app, args)
        assert not path.exists()
    assert second.exit_code == LockedError.exit_code != 0, second.output
    assert "being written by another alignpipe process" in second.output
    assert "Traceback" not in second.output
    again = CliRunner().invoke(app, args)  # once the first has finished, it runs
    assert again.exit_code == 0 and open_store(path).dtype == "float32"


def test_resuming_with_another_batch_size_is_refused_and_the_default_resumes(toy_dir,
                                                                            tmp_path):
    manifest = toy_dir / "toy.parquet"
    options = {"unit_rows": 150, "progress": False}
    clean = embed(manifest, "test-text", tmp_path / "clean", batch_size=8, **options)
    cut = embed(manifest, "test-text", tmp_path / "cut", batch_size=8, **options)
    unmark(cut.path, [2, 3])
    with pytest.raises(EmbedError, match="started with --batch-size 8; resuming it with "
                                         "--batch-size 64"):
        embed(manifest, "test-text", tmp_path / "cut", batch_size=64, **options)
    resumed = embed(manifest, "test-text", tmp_path / "cut", **options)  # keeps 8
    assert resumed.extra["batch_size"] == 8 and resumed.skipped_units == 2
    same_store(clean.path, resumed.path)
    done = embed(manifest, "test-text", tmp_path / "cut", batch_size=64, **options)
    assert done.skipped_units == done.units  # nothing left to run: nothing to refuse


def test_resuming_in_another_compute_dtype_is_refused(toy_dir, tmp_path):
    manifest = toy_dir / "toy.parquet"
    cut = embed(manifest, "test-text", tmp_path, unit_rows=300, progress=False)  # float32
    unmark(cut.path, [1])
    with pytest.raises(StoreError, match="computed in float32; this run would compute in "
                                         "bfloat16"):
        embed(manifest, "test-text", tmp_path, unit_rows=300, dtype="bfloat16",
              progress=False)
    assert open_store(cut.path).done_units() == [0]


# ---- 25 and the dataset name ---------------------------------------------------------------------
@pytest.mark.parametrize("encoder,column,held", [("test-text", "image", "image file paths"),
                                                 ("test-text", "audio", "audio file paths"),
                                                 ("test-vit", "text", "text"),
                                                 ("test-audio", "image", "image file paths")])
def test_a_column_of_another_modality_is_refused(toy_dir, tmp_path, encoder, column, held):
    kind = {"test-text": "a text", "test-vit": "an image", "test-audio": "an audio"}[encoder]
    with pytest.raises(EmbedError, match=f"--column {column} holds {held}, but {encoder} is "
                                         f"{kind} encoder"):
        embed(toy_dir / "toy.parquet", encoder, tmp_path, column=column, progress=False)
    assert not (tmp_path / "toy").exists()


def test_a_text_encoder_reads_other_text_columns(tmp_path):
    import pyarrow as pa

    from alignpipe.data.manifest import write_manifest

    manifest = write_manifest(pa.table({"id": ["a", "b"], "text": ["a cat", "a dog"],
                                        "label": ["cat", "dog"]}), tmp_path / "m.parquet")
    summary = embed(manifest, "test-text", tmp_path / "c", column="label", progress=False)
    assert summary.valid == 2


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "ABSOLUTE", ".", "a\\b", ""])
def test_a_dataset_name_that_leaves_the_cache_is_refused(toy_dir, tmp_path, name):
    cache = tmp_path / "deep" / "cache"
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    with pytest.raises(EmbedError, match="not a plain folder name"):
        embed(toy_dir / "toy.parquet", "test-vit", cache, dataset=name, progress=False)
    with pytest.raises(EmbedError, match="not a plain folder name"):
        embed_status(toy_dir / "toy.parquet", "test-vit", cache, dataset=name)
    assert [p for p in tmp_path.rglob("*")] == []


def test_resuming_a_store_begun_with_another_crop_is_refused(toy_dir, tmp_path):
    """Item 4: a DINOv2 store begun with timm's old 224 resize must not be finished at 256."""
    import zarr

    manifest = toy_dir / "toy.parquet"
    cut = embed(manifest, "test-vit", tmp_path, unit_rows=300, progress=False)
    group = zarr.open_group(str(cut.path), mode="r+")
    encoder = dict(group.attrs["encoder"])
    encoder["request"] = {**encoder["request"], "crop_pct": 1.0}  # as the old resize 224 was
    group.attrs["encoder"] = encoder
    unmark(cut.path, [1])
    with pytest.raises(EmbedError, match=r"crop_pct: store has 1\.0"):
        embed(manifest, "test-vit", tmp_path, unit_rows=300, progress=False)
