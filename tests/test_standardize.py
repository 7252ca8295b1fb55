"""The `standardize` option: exact train statistics, stored with the heads, and it matters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alignpipe.app.results import eval_retrieval
from alignpipe.data.manifest import read_manifest
from alignpipe.data.store import create_store
from alignpipe.fit import fit
from alignpipe.methods import heads


def test_statistics_match_numpy_across_chunks(monkeypatch):
    monkeypatch.setattr(heads, "STATS_CHUNK", 7)  # several chunks, the last one partial
    x = np.random.default_rng(0).normal(3.0, 0.01, size=(50, 5)).astype(np.float32)
    layer = heads.Standardize(5)
    layer.fit(torch.from_numpy(x))
    np.testing.assert_allclose(layer.mean.numpy(), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(1 / layer.inv_std.numpy(), x.std(0), rtol=1e-3)
    out = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-3)


@pytest.fixture(scope="module")
def cone_stores(tmp_path_factory):
    """Two modalities whose latents share a hidden variable but sit in a narrow cone."""
    root = tmp_path_factory.mktemp("cone")
    rng = np.random.default_rng(0)
    rows = 600
    hidden = rng.standard_normal((rows, 8))
    split = np.where(np.arange(rows) < 420, "train", np.where(np.arange(rows) < 510, "val", "test"))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "image": [f"{i}.png" for i in range(rows)],
                             "text": [f"t{i}" for i in range(rows)], "split": split}),
                   root / "cone.parquet")
    manifest = read_manifest(root / "cone.parquet")
    paths = {}
    for side, dim, modality in (("a", 24, "image"), ("b", 32, "text")):
        maps = rng.standard_normal((8, dim))
        offset = 40.0 * rng.standard_normal(dim)  # the cone: a large offset shared by all rows
        latents = offset + 0.02 * np.tanh(hidden @ maps)
        store = create_store(root / side, rows=rows, dim=dim, encoder={"name": side},
                             modality=modality, manifest=manifest, dtype="float32")
        store.write_unit(0, latents, np.ones(rows, bool))
        paths[side] = root / side
    return paths


def test_standardize_is_saved_with_the_heads_and_used_at_eval(cone_stores, tmp_path):
    overrides = {"epochs": "30", "batch_size": "128", "out_dim": "32", "blocks": "1",
                 "expansion": "2", "dropout": "0.1", "warmup_steps": "5", "val_every": "5"}
    scores = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        fit(cone_stores["a"], cone_stores["b"], method="mlp", out=out, progress=False,
            overrides={**overrides, "standardize": flag})
        result = eval_retrieval(out, cone_stores["a"], cone_stores["b"], split="test",
                                output=out / "r.json")
        scores[flag] = result["image_to_text"]["R@5"] + result["text_to_image"]["R@5"]
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "true").glob("heads-best*.safetensors")))
    assert {"norm_a.mean", "norm_a.inv_std", "norm_b.mean"} <= set(saved)
    assert not any(k.startswith("norm_") for k in load_file(
        next((tmp_path / "false").glob("heads-best*.safetensors"))))
    # 90 test items: chance R@5 ≈ 5.6% per direction; standardised heads must be far above it
    assert scores["true"] > 60
    assert scores["true"] > scores["false"] + 20
