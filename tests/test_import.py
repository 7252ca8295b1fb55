"""`alignpipe import` from .npy and from clip-retrieval output, and its refusals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe import open_store, read_manifest
from alignpipe.data.importer import import_latents
from alignpipe.util.errors import ImportDataError


@pytest.fixture()
def manifest_path(toy_dir):
    return toy_dir / "toy.parquet"


def leftovers(cache):
    """Every path under the cache: a refused import must leave none."""
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


def test_npy_round_trip(tmp_path, manifest_path):
    latents = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", latents)
    result = import_latents(tmp_path / "x.npy", manifest=manifest_path, modality="image",
                            encoder="outside-vit", cache=tmp_path / "cache", unit_rows=128)
    store = open_store(result["path"], manifest=read_manifest(manifest_path))
    assert store.n_units == 5 and store.complete
    assert store.encoder["backend"] == "import" and store.encoder["source_sha256"]
    np.testing.assert_allclose(store.read(), latents, atol=2e-3)


def test_npy_row_count_mismatch(tmp_path, manifest_path):
    np.save(tmp_path / "x.npy", np.zeros((599, 8), np.float32))
    with pytest.raises(ImportDataError, match=r"has 599 rows but manifest .* has 600"):
        import_latents(tmp_path / "x.npy", manifest=manifest_path, modality="image",
                       encoder="e", cache=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []


def test_nan_and_inf_rows_named(tmp_path, manifest_path):
    latents = np.ones((600, 8), np.float32)
    latents[17, 3] = np.nan
    latents[450, 0] = np.inf
    np.save(tmp_path / "x.npy", latents)
    with pytest.raises(ImportDataError, match=r"NaN or inf values at rows 17, 450$"):
        import_latents(tmp_path / "x.npy", manifest=manifest_path, modality="image",
                       encoder="e", cache=tmp_path / "cache", unit_rows=600)
    # a failure in a later unit must also leave nothing behind
    latents[17, 3] = 1
    np.save(tmp_path / "x.npy", latents)
    with pytest.raises(ImportDataError, match=r"rows 450"):
        import_latents(tmp_path / "x.npy", manifest=manifest_path, modality="image",
                       encoder="e", cache=tmp_path / "cache", unit_rows=100)
    assert leftovers(tmp_path / "cache") == []


def test_values_beyond_float16_need_float32(tmp_path, manifest_path):
    latents = np.ones((600, 4), np.float32)
    latents[5] = 1e6
    np.save(tmp_path / "x.npy", latents)
    with pytest.raises(ImportDataError, match=r"beyond the float16 range at rows 5;"):
        import_latents(tmp_path / "x.npy", manifest=manifest_path, modality="text",
                       encoder="e", cache=tmp_path / "cache")
    result = import_latents(tmp_path / "x.npy", manifest=manifest_path, modality="text",
                            encoder="e", cache=tmp_path / "cache", dtype="float32")
    assert open_store(result["path"]).read()[5, 0] == 1e6


def clip_retrieval_folder(root, manifest, order, dim=16, files=2):
    """Write img_emb/ + metadata/ as clip-retrieval does, rows in `order`, split into files."""
    images = manifest.column("image")
    rng = np.random.default_rng(0)
    per_image = {}
    for path in images:
        per_image.setdefault(path, rng.standard_normal(dim).astype(np.float32))
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for n, part in enumerate(np.array_split(np.asarray(order), files)):
        keys = [images[i] for i in part]
        np.save(root / "img_emb" / f"img_emb_{n}.npy", np.stack([per_image[k] for k in keys]))
        pq.write_table(pa.table({"image_path": keys, "caption": ["c"] * len(keys)}),
                       root / "metadata" / f"metadata_{n}.parquet")
    return per_image


def test_clip_retrieval_layout_matched_by_key(tmp_path, manifest_path):
    manifest = read_manifest(manifest_path)
    unique_rows = sorted({p: i for i, p in enumerate(manifest.column("image"))}.values())
    order = np.random.default_rng(1).permutation(unique_rows)  # shuffled, one per image
    per_image = clip_retrieval_folder(tmp_path / "cr", manifest, order)
    result = import_latents(tmp_path / "cr", manifest=manifest_path, modality="image",
                            encoder="clip-vit", cache=tmp_path / "cache", unit_rows=256)
    got = open_store(result["path"]).read()
    expected = np.stack([per_image[p] for p in manifest.column("image")])
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_clip_retrieval_unmatched_keys(tmp_path, manifest_path):
    manifest = read_manifest(manifest_path)
    images = manifest.column("image")
    keep = [i for i in range(600) if images[i] != images[10]]
    clip_retrieval_folder(tmp_path / "cr", manifest, keep)
    with pytest.raises(ImportDataError, match=r"2 manifest rows have no embedding.*rows 10, 11"):
        import_latents(tmp_path / "cr", manifest=manifest_path, modality="image",
                       encoder="e", cache=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []
    result = import_latents(tmp_path / "cr", manifest=manifest_path, modality="image",
                            encoder="e", cache=tmp_path / "cache", allow_unmatched=True)
    store = open_store(result["path"])
    assert result["valid"] == 598 and not store.read_valid()[[10, 11]].any()
    assert [f["row"] for f in store.failures()] == [10, 11]


def test_clip_retrieval_wrong_key_column(tmp_path, manifest_path):
    clip_retrieval_folder(tmp_path / "cr", read_manifest(manifest_path), list(range(600)))
    with pytest.raises(ImportDataError, match=r"no column 'url'.*use --key"):
        import_latents(tmp_path / "cr", manifest=manifest_path, modality="image",
                       encoder="e", cache=tmp_path / "cache", key="url=image")
