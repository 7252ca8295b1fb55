"""Issue 8, store integrity: fp16 overflow (2), chunk sizes (11), damaged stores (16), the
atomic import swap and leftovers (21), crc32c checksums (22) and the store lock (20)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data import storefiles
from alignpipe.data.importer import import_latents
from alignpipe.data.manifest import read_manifest
from alignpipe.data.store import (
    TARGET_CHUNK_BYTES,
    create_store,
    lock_store,
    open_store,
    shard_layout,
)
from alignpipe.util.errors import StoreError
from alignpipe.util.fsutil import LockedError

SPEC = {"name": "test", "backend": "unit-test", "model_id": None, "pooling": "cls"}
OVERFLOW = "latent exceeds float16 range; use --latent-dtype float32"


def make_manifest(folder: Path, rows: int) -> Path:
    path = folder / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "text": [f"caption {i}" for i in range(rows)]}), path)
    return path


@pytest.fixture()
def manifest(tmp_path):
    return read_manifest(make_manifest(tmp_path, 100))


@pytest.fixture()
def imported(tmp_path, manifest):
    """A finished 4-unit store made by `import` (so its repair command is a real import)."""
    latents = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", latents)
    result = import_latents(tmp_path / "x.npy", manifest=manifest.path, modality="text",
                            encoder="outside", cache=tmp_path / "cache", unit_rows=25)
    return open_store(result["path"]), latents


def shard(store, unit: int) -> Path:
    return store.path / "latents" / "c" / str(unit) / "0"


# ---- item 2: fp16 overflow ---------------------------------------------------------------------
def test_values_beyond_float16_become_failures_not_inf(tmp_path, manifest):
    store = create_store(tmp_path / "s", rows=100, dim=4, encoder=SPEC, modality="text",
                         manifest=manifest, unit_rows=50)
    latents = np.ones((50, 4), np.float32)
    latents[7, 2] = 1e5          # finite in float32, inf in float16
    latents[9, 0] = -70000.0
    latents[11, 1] = np.nan      # not finite at all
    latents[12, 3] = 60000.0     # within float16: stays valid
    store.write_unit(0, latents, np.ones(50, bool))
    store.write_unit(1, latents, np.ones(50, bool), ids=[f"own{i}" for i in range(50, 100)])
    got, valid = store.read(), store.read_valid()
    assert np.isfinite(got).all()
    assert sorted(np.flatnonzero(~valid)) == [7, 9, 11, 57, 59, 61]
    failures = {f["row"]: f for f in store.failures()}
    assert failures[7] == {"id": "r7", "row": 7, "column": "text", "reason": OVERFLOW}
    assert failures[59]["id"] == "own59" and failures[59]["reason"] == OVERFLOW
    assert failures[11]["reason"] == "latent is NaN or inf"
    assert store.unit_marker(0)["valid"] == 47 and store.unit_marker(0)["failed"] == 3
    assert got[12, 3] == 60000.0 and not got[7].any()


def test_float32_store_keeps_large_values(tmp_path, manifest):
    store = create_store(tmp_path / "s", rows=100, dim=4, encoder=SPEC, modality="text",
                         manifest=manifest, unit_rows=100, dtype="float32")
    latents = np.full((100, 4), 1e5, np.float32)
    store.write_unit(0, latents, np.ones(100, bool))
    assert store.read_valid().all() and store.failures() == []


# ---- item 11: chunk sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [5003, 7919])
def test_prime_row_counts_get_chunks_near_the_byte_target(tmp_path, rows):
    manifest = read_manifest(make_manifest(tmp_path, rows))
    store = create_store(tmp_path / "s", rows=rows, dim=1024, encoder=SPEC, modality="text",
                         manifest=manifest)
    chunk_rows, shard_rows = store.latents.chunks[0], store.latents.shards[0]
    assert chunk_rows * 1024 * 2 > TARGET_CHUNK_BYTES // 2  # not one-row chunks
    assert shard_rows % chunk_rows == 0 and shard_rows == store.unit_rows >= rows
    assert store.n_units == 1 and store.unit_range(0) == (0, rows)
    latents = np.random.default_rng(1).standard_normal((rows, 1024)).astype(np.float16)
    store.write_unit(0, latents, np.ones(rows, bool))
    np.testing.assert_array_equal(open_store(store.path).read(dtype=np.float16), latents)


def test_shard_layout_tiles_every_unit_size():
    for unit_rows in [1, 2, 3, 97, 1000, 5003, 7919, 8191, 8192, 12289, 65521]:
        for dim, itemsize in [(4, 2), (384, 2), (1024, 2), (1536, 4), (10**7, 4)]:
            chunk, unit = shard_layout(unit_rows, dim, itemsize)
            target = max(1, TARGET_CHUNK_BYTES // (dim * itemsize))
            assert unit % chunk == 0 and chunk <= max(target, 1)
            assert unit_rows <= unit < unit_rows + unit // chunk  # grows < 1 row per chunk
            if unit_rows > target:
                assert chunk >= target / 2
            else:
                assert (chunk, unit) == (unit_rows, unit_rows)
    assert shard_layout(8192, 1536, 2) == (512, 8192)  # a divisor keeps the unit as asked


# ---- item 16: damaged stores ---------------------------------------------------------------------
def test_deleted_or_truncated_files_are_found_and_named(imported):
    store, _ = imported
    assert store.damaged_units() == {} and store.complete
    shard(store, 1).unlink()
    (store.path / "valid" / "c" / "2").unlink()
    data = shard(store, 3).read_bytes()
    shard(store, 3).write_bytes(data[: len(data) // 2])
    damaged = store.damaged_units()
    assert sorted(damaged) == [1, 2, 3]
    assert "latents/c/1/0 is missing" in damaged[1] and "valid/c/2 is missing" in damaged[2]
    assert f"{len(data) // 2} bytes, {len(data)} when written" in damaged[3]
    assert store.pending_units() == [1, 2, 3] and not store.complete
    assert not store.is_done(1) and store.is_done(0)
    with pytest.raises(StoreError, match=r"3 damaged work unit\(s\): unit 1 .*unit 2 .*unit 3 "
                                         r".*alignpipe import .*--overwrite"):
        store.require_intact()


def test_repair_command_in_the_message_restores_the_store(imported):
    store, latents = imported
    before = store.read()
    shard(store, 2).unlink()
    with pytest.raises(StoreError) as refused:
        store.require_intact()
    command = str(refused.value).split("to redo them: ", 1)[1].split()
    assert command[:2] == ["alignpipe", "import"]
    result = CliRunner().invoke(app, command[1:])
    assert result.exit_code == 0, result.output
    repaired = open_store(store.path)
    repaired.require_intact()
    np.testing.assert_array_equal(repaired.read(), before)


def test_flipped_byte_is_found_by_verify_and_never_read(imported):
    store, _ = imported
    path = shard(store, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    assert store.damaged_units() == {}  # same size: the cheap check cannot see it
    assert "does not match its sha256" in store.damaged_units(checksums=True)[2]
    with pytest.raises(StoreError, match=r"unit 2 .*alignpipe import"):
        store.read()  # crc32c catches it on read (item 22): the damaged-store message
    with pytest.raises(StoreError, match="unit 2"):
        store.read([60])
    result = CliRunner().invoke(app, ["info", str(store.path), "--verify"])
    assert result.exit_code != 0 and "unit 2" in result.output
    assert "Traceback" not in result.output


def test_a_flipped_byte_in_an_embedded_store_is_redone_by_the_command_it_names(tmp_path,
                                                                             manifest):
    # Same size, other bytes: embed's cheap check skips the unit, so the repair command the
    # message names must ask for --verify, and running it restores the store.
    from alignpipe.embed import embed

    made = embed(manifest.path, "test-text", tmp_path / "cache", unit_rows=25, workers=1,
                 progress=False)
    store = open_store(made.path)
    before = store.read()
    path = shard(store, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as refused:
        store.read()
    command = str(refused.value).split("to redo them: ", 1)[1].split()
    assert command[:2] == ["alignpipe", "embed"] and command[-1] == "--verify"
    result = CliRunner().invoke(app, [*command[1:], "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 of 4 work units embedded, 3 skipped" in result.output
    repaired = open_store(store.path)
    assert repaired.damaged_units(checksums=True) == {}
    np.testing.assert_array_equal(repaired.read(), before)
    shard(repaired, 2).unlink()  # damage the cheap check sees needs no --verify
    assert not repaired.damage_message(repaired.damaged_units()).endswith("--verify")


def test_info_reports_damage_and_verifies_an_intact_store(imported):
    store, _ = imported
    ok = CliRunner().invoke(app, ["info", str(store.path), "--verify"])
    assert ok.exit_code == 0 and "verified: 4 finished units" in ok.output
    (store.path / "valid" / "c" / "0").unlink()
    cheap = CliRunner().invoke(app, ["info", str(store.path), "--json"])
    assert cheap.exit_code != 0
    assert json.loads(cheap.stdout[: cheap.stdout.rindex("}") + 1])["damaged_units"] == {
        "0": "valid/c/0 is missing"}


def test_crc32c_is_in_the_codecs_and_plain_zarr_still_reads(imported):
    store, latents = imported
    for name in ("latents", "valid"):
        codecs = json.dumps(json.loads((store.path / name / "zarr.json").read_text())["codecs"])
        assert '"crc32c"' in codecs.split('"index_codecs"')[0]
    plain = zarr.open_group(store.path, mode="r")["latents"][:]
    np.testing.assert_allclose(plain, latents, atol=2e-3)


def test_markers_without_file_records_still_work(imported):
    store, _ = imported
    for marker in store.units_dir.glob("*.done"):  # as written before this change
        record = json.loads(marker.read_text())
        record.pop("files")
        marker.write_text(json.dumps(record))
    assert store.damaged_units(checksums=True) == {} and store.complete
    (store.path / "valid" / "c" / "1").unlink()
    assert store.damaged_units() == {1: "valid/c/1 is missing"}
    shard(store, 3).write_bytes(shard(store, 3).read_bytes()[:-100])
    assert "cannot be decoded" in store.damaged_units(checksums=True)[3]


def test_a_rewrite_cut_short_leaves_the_unit_undone(imported, monkeypatch):
    store, _ = imported

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(store.latents), "__setitem__", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_unit(1, np.zeros((25, 8)), np.ones(25, bool))
    assert store.pending_units() == [1]


def test_embed_rerun_redoes_only_the_damaged_unit(tmp_path):
    from alignpipe.embed import embed

    path = make_manifest(tmp_path, 30)
    first = embed(path, "test-text", tmp_path / "cache", unit_rows=10, progress=False)
    store = open_store(first.path)
    before = store.latents[:]
    shard(store, 1).unlink()
    with pytest.raises(StoreError, match=r"unit 1 .*alignpipe embed .*--encoder test-text"):
        store.require_intact()
    again = embed(path, "test-text", tmp_path / "cache", unit_rows=10, progress=False)
    assert again.skipped_units == 2 and again.embedded_rows == 10
    store.require_intact()
    np.testing.assert_array_equal(store.latents[:], before)


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_damaged_array_metadata_is_one_line(imported, damage):
    store, _ = imported
    meta = store.path / ("latents" if damage == "garbage" else "valid") / "zarr.json"
    if damage == "garbage":
        meta.write_text('{"zarr_format": 3, "node_type": "array", garbage')
    else:
        meta.unlink()
    result = CliRunner().invoke(app, ["info", str(store.path)])
    assert result.exit_code == 2, result.output
    assert f"{store.path}: damaged store" in result.output
    assert "Traceback" not in result.output


# ---- item 21: atomic import --overwrite, leftovers -----------------------------------------------
def test_import_overwrite_keeps_one_whole_store_at_every_kill_point(tmp_path, manifest,
                                                                     monkeypatch):
    old = np.full((100, 8), 1.0, np.float32)
    new = np.full((100, 8), 2.0, np.float32)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    options = {"manifest": manifest.path, "modality": "text", "encoder": "e", "unit_rows": 50}
    real_rename = storefiles.rename
    for kill_at in range(4):  # the swap's four renames
        cache = tmp_path / f"cache{kill_at}"
        target = Path(import_latents(tmp_path / "old.npy", cache=cache, **options)["path"])
        calls = []

        def rename(source, target, kill_at=kill_at, calls=calls):
            if len(calls) == kill_at:
                raise KeyboardInterrupt  # the process dies here
            calls.append(source)
            real_rename(source, target)

        monkeypatch.setattr(storefiles, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            import_latents(tmp_path / "new.npy", cache=cache, overwrite=True, **options)
        monkeypatch.setattr(storefiles, "rename", real_rename)
        with lock_store(target):  # what the next run does first
            pass
        values = open_store(target).read()
        assert np.array_equal(values, old) or np.array_equal(values, new), kill_at
        left = sorted(p.name for p in target.parent.iterdir())
        assert left == ["e", "e.failures.parquet"], kill_at


def test_a_reader_finds_the_store_an_import_killed_mid_swap_set_aside(tmp_path, manifest,
                                                                      monkeypatch):
    options = {"manifest": manifest.path, "modality": "text", "encoder": "e", "unit_rows": 50}
    old = np.full((100, 8), 1.0, np.float32)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", old + 1)
    target = Path(import_latents(tmp_path / "old.npy", cache=tmp_path / "c", **options)["path"])
    real_rename = storefiles.rename
    calls = []

    def rename(source, target):
        if len(calls) == 2:  # both parts of the old store are aside, the new one not yet in
            raise KeyboardInterrupt
        calls.append(source)
        real_rename(source, target)

    monkeypatch.setattr(storefiles, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        import_latents(tmp_path / "new.npy", cache=tmp_path / "c", overwrite=True, **options)
    monkeypatch.setattr(storefiles, "rename", real_rename)
    assert not target.exists()
    result = CliRunner().invoke(app, ["info", str(target)])  # a reader, not a writer
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(open_store(target).read(), old)


def test_leftovers_of_killed_runs_are_removed_on_the_next_run(imported, tmp_path):
    store, _ = imported
    staging = store.path.with_name(f".{store.path.name}.staging-deadbeef")
    shutil.copytree(store.path, staging)
    (store.path.with_name(f".{staging.name}.failures.parquet.tmp-0123")).write_bytes(b"x")
    (store.units_dir / ".00001.done.tmp-abcdef").write_text("{")
    (store.path.with_name(f".{store.path.name}.failures.parquet.tmp-4567")).write_bytes(b"x")
    other = store.path.with_name(".other.staging-12345678")  # another store's: not ours
    other.mkdir()
    with lock_store(store.path):
        pass
    assert sorted(p.name for p in store.path.parent.iterdir()) == [
        ".other.staging-12345678", store.path.name, f"{store.path.name}.failures.parquet"]
    assert not list(store.units_dir.glob(".*"))
    store.require_intact()


# ---- item 20 (store part): one writer per store --------------------------------------------------
def test_a_second_writer_is_refused_and_leaves_nothing(tmp_path, manifest):
    np.save(tmp_path / "x.npy", np.ones((100, 8), np.float32))
    target = tmp_path / "cache" / "m" / "e"
    with lock_store(target):
        assert target.with_name("e.lock").exists()
        expected = (f"store {target} is being written by another alignpipe process "
                    f"(pid {os.getpid()}")
        with pytest.raises(LockedError, match=re.escape(expected)):
            import_latents(tmp_path / "x.npy", manifest=manifest.path, modality="text",
                           encoder="e", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # lock released, no empty folders left


def test_the_repair_command_names_the_manifest_where_it_is_after_a_move(tmp_path, manifest):
    """Item 10 with item 16: a project moved as a whole gets a repair command it can run."""
    import shutil

    np.save(tmp_path / "x.npy", np.ones((100, 8), np.float32))
    result = import_latents(tmp_path / "x.npy", manifest=manifest.path, modality="text",
                            encoder="outside", cache=tmp_path / "cache", unit_rows=25)
    store_rel = Path(result["path"]).relative_to(tmp_path)
    manifest_rel = Path(manifest.path).relative_to(tmp_path)
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    shutil.rmtree(tmp_path / "cache")
    Path(manifest.path).unlink()
    store = open_store(moved / store_rel)
    shard(store, 1).unlink()
    with pytest.raises(StoreError) as refused:
        store.require_intact()
    command = str(refused.value).split("to redo them: ", 1)[1].split()
    assert command[command.index("--manifest") + 1] == str((moved / manifest_rel).resolve())
