"""The latent store: layout, round trip, work units, and the manifest contract."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from alignpipe import open_store
from alignpipe.data.manifest import read_manifest
from alignpipe.data.store import chunk_rows_for, create_store, store_path
from alignpipe.util.errors import StoreError

SPEC = {"name": "test", "backend": "unit-test", "model_id": None, "pooling": "cls"}


@pytest.fixture()
def manifest(tmp_path):
    rows = 1000
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "text": [f"t{i}" for i in range(rows)]}), path)
    return read_manifest(path)


def fill(store, rng):
    expected = rng.standard_normal((store.rows, store.dim)).astype(np.float32)
    valid = rng.random(store.rows) > 0.1
    for unit in range(store.n_units):
        start, stop = store.unit_range(unit)
        store.write_unit(unit, expected[start:stop], valid[start:stop])
    return expected, valid


def test_round_trip_and_layout(tmp_path, manifest):
    path = store_path(tmp_path / "cache", "m", "hf:org/model")
    assert path.name == "hf-org--model"
    store = create_store(path, rows=1000, dim=96, encoder=SPEC, modality="text",
                         manifest=manifest, unit_rows=256)
    assert store.n_units == 4 and store.unit_range(3) == (768, 1000)
    assert store.pending_units() == [0, 1, 2, 3]
    expected, valid = fill(store, np.random.default_rng(0))

    reopened = open_store(path, manifest=manifest)
    assert reopened.complete and reopened.done_units() == [0, 1, 2, 3]
    got = reopened.read()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(reopened.read_valid(), valid)
    # fp16 storage: within half precision of the input where valid, zero where invalid
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-3, atol=1e-3)
    assert not got[~valid].any()
    np.testing.assert_array_equal(reopened.read([5, 900, 7]), got[[5, 900, 7]])
    attrs = reopened.attrs
    assert attrs["encoder"]["dim"] == 96 and attrs["modality"] == "text"
    assert attrs["manifest"]["sha256"] == manifest.sha256 and attrs["manifest"]["rows"] == 1000


def test_plain_zarr_and_dask_read_it_without_alignpipe(tmp_path, manifest):
    store = create_store(tmp_path / "s", rows=1000, dim=8, encoder=SPEC, modality="image",
                         manifest=manifest, unit_rows=512, dtype="float32")
    expected, _ = fill(store, np.random.default_rng(1))
    group = zarr.open_group(tmp_path / "s", mode="r")
    assert set(group.array_keys()) == {"latents", "valid"}  # the root holds only Zarr arrays
    assert group["latents"].shards == (512, 8)
    lazy = da.from_zarr(str(tmp_path / "s"), component="latents")
    valid = group["valid"][:]
    np.testing.assert_array_equal(lazy.compute()[valid], expected[valid])


def test_chunks_are_about_two_megabytes():
    assert chunk_rows_for(8192, 1024, 2) == 1024  # 1024 rows × 1024 × 2 B = 2 MB
    assert 8192 % chunk_rows_for(8192, 1536, 2) == 0
    assert chunk_rows_for(100, 4, 2) == 100


def test_manifest_mismatch_is_refused(tmp_path, manifest):
    create_store(tmp_path / "s", rows=1000, dim=4, encoder=SPEC, modality="text",
                 manifest=manifest)
    other_path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(1000)], "text": ["t"] * 1000}),
                   other_path)
    with pytest.raises(StoreError, match=r"store was built from manifest .*m\.parquet.*"
                                         r"other\.parquet has sha256"):
        open_store(tmp_path / "s", manifest=read_manifest(other_path))


def test_existing_store_needs_overwrite(tmp_path, manifest):
    create_store(tmp_path / "s", rows=1000, dim=4, encoder=SPEC, modality="text",
                 manifest=manifest)
    with pytest.raises(StoreError, match="pass --overwrite"):
        create_store(tmp_path / "s", rows=1000, dim=4, encoder=SPEC, modality="text",
                     manifest=manifest)
    store = create_store(tmp_path / "s", rows=1000, dim=5, encoder=SPEC, modality="text",
                         manifest=manifest, overwrite=True)
    assert store.dim == 5


def test_write_unit_checks_shape_and_records_failures(tmp_path, manifest):
    store = create_store(tmp_path / "s", rows=1000, dim=4, encoder=SPEC, modality="text",
                         manifest=manifest, unit_rows=500)
    with pytest.raises(StoreError, match=r"unit 0 needs latents of shape \(500, 4\)"):
        store.write_unit(0, np.zeros((499, 4)), np.ones(499, bool))
    failure = {"id": "r3", "row": 3, "column": "text", "reason": "empty text"}
    store.write_unit(0, np.ones((500, 4)), np.arange(500) != 3, [failure])
    assert store.done_units() == [0] and not store.complete
    assert store.failures() == [failure]
    merged = pq.read_table(store.merge_failures()).to_pylist()
    assert merged == [failure]
    assert store.failures_path.parent == store.path.parent  # beside the store, not inside


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not an alignpipe latent store"):
        open_store(tmp_path / "empty")
