"""Stage one end to end on the toy set: the store it writes, dedupe, order, resume, refusals."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data.manifest import write_manifest
from alignpipe.data.store import open_store
from alignpipe.embed import EmbedError, embed, embed_status
from alignpipe.encoders import EncoderError, load_encoder


def run(toy: Path, encoder: str, cache: Path, **kwargs):
    return embed(toy / "toy.parquet", encoder, cache, progress=False, **kwargs)


def test_store_holds_every_row_with_provenance(toy_dir, tmp_path):
    summary = run(toy_dir, "test-vit", tmp_path / "cache", unit_rows=128)
    store = open_store(summary.path)
    assert (store.rows, store.dim, store.dtype, store.n_units) == (600, 32, "float16", 5)
    assert store.complete and store.read_valid().all()
    assert store.latents.shards == (128, 32)  # one work unit = one shard
    enc = store.encoder
    assert enc["name"] == "test-vit" and enc["backend"] == "timm" and enc["pooling"] == "cls"
    assert enc["preprocessing"]["input_size"] == [3, 32, 32]
    assert enc["weights"] == "test" and enc["request"]["column"] == "image"
    assert store.manifest_info["sha256"] == summary_sha(toy_dir)
    plain = zarr.open_group(summary.path, mode="r")["latents"][:]  # no alignpipe needed
    lazy = da.from_zarr(str(summary.path), component="latents").compute()
    np.testing.assert_array_equal(plain, lazy)
    assert summary.rows == 600 and summary.failed == 0 and summary.units == 5
    assert "600 rows" in summary.line() and "5 of 5 work units" in summary.line()


def summary_sha(toy: Path) -> str:
    from alignpipe.data.manifest import file_sha256

    return file_sha256(toy / "toy.parquet")


def test_media_shared_by_rows_is_decoded_and_encoded_once(toy_dir, tmp_path, monkeypatch):
    from alignpipe.encoders import vision

    monkeypatch.setenv("ALIGNPIPE_DECODER", "threads")  # counts live in this process
    decoded, encoded = [], []
    real_open, real_forward = vision.open_image, vision.TimmImageEncoder.forward
    monkeypatch.setattr(vision, "open_image", lambda ref: decoded.append(ref) or real_open(ref))

    def counting_forward(self, batch):
        encoded.append(len(batch["pixels"]))
        return real_forward(self, batch)

    monkeypatch.setattr(vision.TimmImageEncoder, "forward", counting_forward)
    summary = run(toy_dir, "test-vit", tmp_path / "cache")
    assert len(decoded) == 300 and len(set(decoded)) == 300
    assert sum(encoded) == 300 and summary.encoded_items == 300
    latents = open_store(summary.path).read()
    np.testing.assert_array_equal(latents[0::2], latents[1::2])  # rows 2k, 2k+1 share a file


def test_rerun_skips_finished_units_and_says_how_many(toy_dir, tmp_path):
    first = run(toy_dir, "test-vit", tmp_path / "cache", unit_rows=200)
    before = open_store(first.path).read()
    again = run(toy_dir, "test-vit", tmp_path / "cache", unit_rows=200, device="cuda:7")
    # a finished store needs no model at all (cuda:7 would fail to load on this machine)
    assert (again.skipped_units, again.units, again.embedded_rows) == (3, 3, 0)
    assert "3 skipped" in again.line()
    np.testing.assert_array_equal(open_store(again.path).read(), before)


def test_manifest_order_survives_length_bucketing(tmp_path):
    rng = np.random.default_rng(1)
    words = ["red", "circle", "big", "tiny", "square", "near", "the", "top", "a", "blue"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 25)))) for _ in range(40)]
    manifest = write_manifest(pa.table({"id": [f"t{i}" for i in range(40)], "text": texts}),
                              tmp_path / "texts.parquet")
    summary = embed(manifest, "test-text", tmp_path / "cache", batch_size=4, progress=False,
                    latent_dtype="float32")
    latents = open_store(summary.path).read()
    encoder = load_encoder("test-text", device="cpu")
    with torch.inference_mode():
        direct = np.stack([encoder.forward(encoder.collate([t]))[0].numpy() for t in texts])
    np.testing.assert_allclose(latents, direct, rtol=1e-4, atol=1e-5)
    nearest = ((latents[:, None] - direct[None]) ** 2).sum(-1).argmin(1)
    assert list(nearest) == list(range(40))


def test_other_spec_or_manifest_is_refused_unless_overwrite(toy_dir, tmp_path):
    cache = tmp_path / "cache"
    run(toy_dir, "test-vit", cache)
    with pytest.raises(EmbedError, match="pooling.*--overwrite"):
        run(toy_dir, "test-vit", cache, pooling="mean")
    other = write_manifest(pq.read_table(toy_dir / "toy.parquet").slice(0, 100),
                           tmp_path / "toy.parquet")  # same dataset name, other rows
    with pytest.raises(EmbedError, match="manifest"):
        embed(other, "test-vit", cache, progress=False)
    broken = tmp_path / "broken.safetensors"
    save_file({"x": torch.zeros(1)}, broken)
    with pytest.raises(EncoderError, match="does not fit"):
        run(toy_dir, "test-vit", cache, weights=broken, overwrite=True)
    assert open_store(cache / "toy" / "test-vit").encoder["pooling"] == "cls"  # still there
    replaced = run(toy_dir, "test-vit", cache, pooling="mean", overwrite=True)
    assert open_store(replaced.path).encoder["pooling"] == "mean"


def test_status_needs_no_weights(toy_dir, tmp_path, monkeypatch):
    from alignpipe.encoders import vision

    cache = tmp_path / "cache"
    manifest = toy_dir / "toy.parquet"
    assert embed_status(manifest, "test-vit", cache) == "missing"
    summary = run(toy_dir, "test-vit", cache, unit_rows=200)

    def refuse(*args, **kwargs):
        raise AssertionError("embed_status loaded an encoder")

    monkeypatch.setattr(vision.TimmImageEncoder, "__init__", refuse)
    assert embed_status(manifest, "test-vit", cache) == "complete"
    assert embed_status(manifest, "test-vit", cache, pooling="mean") == "conflict"
    assert embed_status(manifest, "test-vit", cache, latent_dtype="float32") == "conflict"
    (summary.path / "units" / "00001.done").unlink()
    assert embed_status(manifest, "test-vit", cache) == "partial"


def test_tar_members_decode_like_files(toy_dir, tmp_path):
    shard = tmp_path / "shards" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as archive:
        for k in range(10):
            name = f"{k:06d}.{'png' if k % 2 == 0 else 'jpg'}"
            archive.add(toy_dir / "images" / "000" / name, arcname=f"sample{k}.{name[-3:]}")
    files = [str(toy_dir / "images" / "000" / f"{k:06d}.{'png' if k % 2 == 0 else 'jpg'}")
             for k in range(10)]
    members = [f"shards/000000.tar::sample{k}.{f[-3:]}" for k, f in enumerate(files)]
    members.append("shards/000000.tar::not-there.jpg")
    table = pa.table({"id": [f"r{i}" for i in range(21)], "image": files + members})
    manifest = write_manifest(table, tmp_path / "mixed.parquet")
    summary = embed(manifest, "test-vit", tmp_path / "cache", progress=False,
                    max_failure_rate=0.1)
    store = open_store(summary.path)
    latents = store.read()
    np.testing.assert_array_equal(latents[:10], latents[10:20])
    assert list(store.read_valid()) == [True] * 20 + [False]
    assert "no member 'not-there.jpg'" in store.failures()[0]["reason"]


def test_cli_embed_list_and_errors(toy_dir, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["embed", "--list-encoders"])
    assert listed.exit_code == 0
    for name in ("dinov2", "all-roberta-large-v1", "whisper", "test-vit", "clip-l14-image"):
        assert name in listed.output
    args = ["embed", str(toy_dir / "toy.parquet"), "--cache", str(tmp_path / "c"),
            "--no-progress"]
    done = runner.invoke(app, [*args, "--encoder", "test-vit", "--unit-rows", "300"])
    assert done.exit_code == 0, done.output
    assert "600 rows, 600 valid, 0 failed" in done.output
    again = runner.invoke(app, [*args, "--encoder", "test-vit", "--unit-rows", "300"])
    assert "2 skipped" in again.output
    unknown = runner.invoke(app, [*args, "--encoder", "dinov3"])
    assert unknown.exit_code == 2 and "unknown encoder 'dinov3'" in unknown.output
    assert "did you mean dinov2" in unknown.output and "Traceback" not in unknown.output
    conflict = runner.invoke(app, [*args, "--encoder", "test-vit", "--pooling", "mean"])
    assert conflict.exit_code == 2 and "--overwrite" in conflict.output
    column = runner.invoke(app, [*args, "--encoder", "test-vit", "--column", "picture"])
    assert column.exit_code == 2 and "no column 'picture'" in column.output


def test_cli_exit_code_when_too_many_rows_fail(toy_copy, tmp_path):
    for k in range(4):
        (toy_copy / "audio" / "000" / f"{k:06d}.wav").unlink()
    args = ["embed", str(toy_copy / "toy.parquet"), "--encoder", "test-audio", "--cache",
            str(tmp_path / "c"), "--no-progress"]
    failed = CliRunner().invoke(app, [*args, "--max-failure-rate", "0.01"])
    assert failed.exit_code == 3
    assert "8 failed" in failed.output and "--max-failure-rate" in failed.output
    allowed = CliRunner().invoke(app, [*args, "--max-failure-rate", "0.02"])
    assert allowed.exit_code == 0 and "1 skipped" in allowed.output


def test_bench_embed_reports_all_three_loops_and_ratios():
    from alignpipe.app.benchmarks.embed import run_embed_bench

    rows = {r["name"]: r for r in run_embed_bench(rows=64, device="cpu", quick=True)}
    for name in ("embed", "bare forward loop", "naive decode→forward loop"):
        assert rows[name]["unit"] == "rows/s" and rows[name]["value"] > 0
    naive = rows["naive decode→forward loop"]["value"]
    assert rows["embed / naive loop"]["value"] == pytest.approx(rows["embed"]["value"] / naive)


def test_tar_shards_keep_memory_and_descriptors_bounded(tmp_path, monkeypatch):
    from alignpipe.data import media

    monkeypatch.setattr(media, "TAR_INDEXES_KEPT", 2)
    monkeypatch.setattr(media, "_TAR_INDEXES", media.OrderedDict())
    payloads = {}
    for n in range(5):
        shard = tmp_path / f"{n:05d}.tar"
        member = tmp_path / f"m{n}.txt"
        member.write_bytes(f"payload {n}".encode())
        with tarfile.open(shard, "w") as archive:
            archive.add(member, arcname="m.txt")
        payloads[shard] = f"payload {n}".encode()
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for shard, payload in payloads.items():
            assert media.read_bytes(media.MediaRef(shard, "m.txt")) == payload
    assert len(media._TAR_INDEXES) == 2  # only the most recent shards stay indexed
    assert len(os.listdir("/proc/self/fd")) == open_before  # no descriptor left open
