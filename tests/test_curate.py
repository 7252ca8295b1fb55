"""Curation (alignpipe/curate): the streaming top-N against a brute-force reference, the union,
balancing, near-duplicates, resume from per-shard results, the dask run, and bad inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alignpipe.curate import (
    SelectionError,
    check_selection,
    curate,
    read_selection,
    write_selection,
)
from alignpipe.curate.topk import TopN, balance, merge, near_duplicates, tree_merge
from alignpipe.data.manifest import read_manifest, write_manifest
from alignpipe.data.store import create_store
from alignpipe.util.errors import AlignpipeError


def _store(path, manifest_path, latents, modality="text", name="enc", invalid=(),
           unit_rows=64):
    manifest = read_manifest(manifest_path)
    store = create_store(path, rows=latents.shape[0], dim=latents.shape[1],
                         encoder={"name": name, "backend": "test", "model_id": None},
                         modality=modality, manifest=manifest, unit_rows=unit_rows,
                         dtype="float32", overwrite=True)
    valid = np.ones(latents.shape[0], dtype=bool)
    valid[list(invalid)] = False
    for unit in range(store.n_units):
        start, stop = store.unit_range(unit)
        store.write_unit(unit, latents[start:stop], valid[start:stop], [
            {"id": manifest.ids[r], "row": r, "column": modality, "reason": "test"}
            for r in range(start, stop) if not valid[r]])
    return store


@pytest.fixture()
def world(tmp_path):
    """A 300-row pool (5 shards of 64), 6 concept classes × 3 prompts, an image store."""
    rng = np.random.default_rng(0)
    dim, rows, classes = 16, 300, 6
    pool = write_manifest(pa.table({"id": [f"p{i}" for i in range(rows)],
                                    "text": [f"caption {i}" for i in range(rows)],
                                    "split": ["train"] * 250 + ["val"] * 50}),
                          tmp_path / "pool.parquet")
    latents = rng.standard_normal((rows, dim)).astype(np.float32)
    latents[7] = latents[3]  # an exact tie in every concept's score
    invalid = [0, 5, 130]
    pool_store = _store(tmp_path / "cache/pool/enc", pool, latents, invalid=invalid)
    image = latents[:, ::-1].copy()
    image[11] = image[10] * 1.01  # a near-duplicate image
    image_store = _store(tmp_path / "cache/pool/img", pool, image, modality="image",
                         name="img", invalid=[200])
    prompts = write_manifest(pa.table({
        "id": [f"c{c}t{t}" for c in range(classes) for t in range(3)],
        "text": [f"t{t} c{c}" for c in range(classes) for t in range(3)],
        "label": [f"class {c}" for c in range(classes) for _ in range(3)]}),
        tmp_path / "prompts.parquet")
    concept_latents = rng.standard_normal((classes * 3, dim)).astype(np.float32)
    concept_store = _store(tmp_path / "cache/prompts/enc", prompts, concept_latents,
                           invalid=[4])
    return {"pool": pool_store, "image": image_store, "concepts": concept_store,
            "latents": latents, "concept_latents": concept_latents, "invalid": invalid,
            "tmp": tmp_path, "pool_manifest": pool}


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(world, n, threshold=None, extra_invalid=()):
    """Full similarity matrix, argsort per concept, union by best concept (float64)."""
    cl = _unit(world["concept_latents"].astype(np.float64))
    keep_rows = [r for r in range(18) if r != 4]
    concepts = np.stack([_unit(cl[[r for r in keep_rows if r // 3 == c]].mean(0)[None])[0]
                         for c in range(6)])
    sims = _unit(world["latents"].astype(np.float64)) @ concepts.T
    bad = set(world["invalid"]) | set(extra_invalid)
    best: dict[int, tuple[float, int]] = {}
    for c in range(6):
        order = sorted(range(sims.shape[0]), key=lambda r: (-round(sims[r, c], 5), r))
        chosen = [r for r in order if r not in bad and
                  (threshold is None or sims[r, c] >= threshold)][:n]
        for r in chosen:
            if r not in best or sims[r, c] > best[r][0] + 1e-9:
                best[r] = (sims[r, c], c)
    return {r: (f"class {c}", s) for r, (s, c) in best.items()}


@pytest.mark.parametrize("n,threshold", [(10, None), (40, None), (25, 0.2), (500, None)])
def test_selection_matches_brute_force(world, n, threshold):
    result = curate(world["pool"].path, [world["concepts"].path], per_concept=n,
                    threshold=threshold, device="cpu")
    expected = _brute(world, n, threshold)
    sel = result.selection
    assert sorted(expected) == sel.rows.tolist()
    for row, concept, score in zip(sel.rows, sel.concepts, sel.scores, strict=True):
        assert concept == expected[row][0]
        assert score == pytest.approx(expected[row][1], abs=1e-5)
    assert not set(world["invalid"]) & set(sel.rows.tolist())
    assert result.per_concept.sum() == len(sel)


def test_merge_is_order_free_and_ties_go_to_the_lower_row():
    rng = np.random.default_rng(1)
    parts = []
    for i in range(7):
        scores = np.round(rng.random((3, 5)), 1).astype(np.float32)  # many ties
        rows = np.arange(i * 5, i * 5 + 5)[None].repeat(3, 0)
        parts.append(TopN(scores, rows))
    linear = TopN.empty(3)
    for part in parts:
        linear = merge(linear, part, 6)
    tree = tree_merge(parts[::-1], 6, 3)
    np.testing.assert_array_equal(linear.rows, tree.rows)
    all_s = np.concatenate([p.scores for p in parts], 1)
    all_r = np.concatenate([p.rows for p in parts], 1)
    for c in range(3):
        ref = sorted(zip(-all_s[c], all_r[c], strict=True))[:6]
        assert [r for _, r in ref] == linear.rows[c].tolist()


def test_balance_caps_each_concept_at_its_best_rows():
    rows = np.arange(10)
    concept = np.array([0, 0, 0, 1, 1, 0, 2, 0, 1, 1])
    scores = np.array([.1, .9, .5, .3, .8, .7, .2, .6, .4, .95], dtype=np.float32)
    keep = balance(rows, concept, scores, 2)
    assert sorted(rows[keep].tolist()) == [1, 4, 5, 6, 9]


def test_near_duplicates_greedy_against_brute_force():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    x[30:40] = x[:10] + 0.01 * rng.standard_normal((10, 8))
    scores = rng.random(60).astype(np.float32)
    rows = np.arange(60)
    keep = near_duplicates(x, scores, rows, 0.95, __import__("torch").device("cpu"), block=7)
    u = _unit(x.astype(np.float64))
    kept = []
    for i in sorted(range(60), key=lambda i: -scores[i]):
        if all(u[i] @ u[j] <= 0.95 for j in kept):
            kept.append(i)
    assert sorted(kept) == rows[keep].tolist()
    assert keep.sum() == 50


def test_dedupe_drops_near_duplicate_images_and_their_invalid_rows(world):
    plain = curate(world["pool"].path, [world["concepts"].path], per_concept=500,
                   device="cpu").selection
    deduped = curate(world["pool"].path, [world["concepts"].path], per_concept=500,
                     dedupe_store=world["image"].path, dedupe_threshold=0.99,
                     device="cpu").selection
    gone = set(plain.rows.tolist()) - set(deduped.rows.tolist())
    assert 200 in gone  # invalid in the image store
    assert (10 in gone) != (11 in gone)  # one of the near-duplicate pair is kept
    assert 3 not in gone or 7 not in gone


def test_written_selection_round_trips_and_is_checked(world):
    result = curate(world["pool"].path, [world["concepts"].path], per_concept=10,
                    balance_cap=5, device="cpu")
    path = write_selection(result.selection, world["tmp"] / "sel.parquet")
    sel = read_selection(path)
    assert sel.rows.tolist() == result.selection.rows.tolist()
    assert max(np.unique(sel.concepts, return_counts=True)[1]) <= 5
    assert sel.meta["spec"]["per_concept"] == 10
    manifest = read_manifest(world["pool_manifest"])
    check_selection(sel, manifest)
    assert sel.ids == [manifest.ids[r] for r in sel.rows]
    other = write_manifest(pa.table({"id": [f"q{i}" for i in range(300)],
                                     "text": ["x"] * 300}), world["tmp"] / "other.parquet")
    with pytest.raises(SelectionError, match="another|sha256"):
        check_selection(sel, read_manifest(other))


def test_resume_skips_finished_shards_and_gives_the_same_selection(world, monkeypatch):
    parts = world["tmp"] / "parts"
    first = curate(world["pool"].path, [world["concepts"].path], per_concept=20,
                   parts=parts, device="cpu")
    assert len(list(parts.glob("*.npz"))) == 5
    (parts / "00002.npz").unlink()
    calls = []
    import alignpipe.curate as mod

    real = mod.range_topn
    monkeypatch.setattr(mod, "range_topn", lambda store, start, *a: calls.append(start) or
                        real(store, start, *a))
    again = curate(world["pool"].path, [world["concepts"].path], per_concept=20,
                   parts=parts, device="cpu")
    assert calls == [128]
    assert again.shards_skipped == 4
    assert again.selection.rows.tolist() == first.selection.rows.tolist()
    # another spec does not reuse the parts
    other = curate(world["pool"].path, [world["concepts"].path], per_concept=3,
                   parts=parts, device="cpu")
    assert len(other.selection) < len(first.selection)
    assert len(calls) == 6


def test_dask_run_equals_single_process(world):
    distributed = pytest.importorskip("distributed")
    single = curate(world["pool"].path, [world["concepts"].path], per_concept=15,
                    device="cpu").selection
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_dask = curate(world["pool"].path, [world["concepts"].path], per_concept=15,
                         device="cpu", client=client).selection
    assert on_dask.rows.tolist() == single.rows.tolist()
    assert on_dask.concepts == single.concepts
    np.testing.assert_array_equal(on_dask.scores, single.scores)


def test_bad_inputs_are_refused_before_any_work(world, tmp_path):
    with pytest.raises(AlignpipeError, match="per-concept"):
        curate(world["pool"].path, [world["concepts"].path], per_concept=0)
    # concepts of another encoder
    wrong = _store(tmp_path / "cache/prompts/other", tmp_path / "prompts.parquet",
                   world["concept_latents"], name="other-encoder")
    with pytest.raises(AlignpipeError, match="another encoder"):
        curate(world["pool"].path, [wrong.path], per_concept=5)
    # a dedupe store of another manifest
    with pytest.raises(AlignpipeError, match="different manifests"):
        curate(world["pool"].path, [world["concepts"].path], per_concept=5,
               dedupe_store=world["concepts"].path)
    # nothing passes the threshold: an empty selection is not written
    result = curate(world["pool"].path, [world["concepts"].path], per_concept=5,
                    threshold=0.999, device="cpu")
    with pytest.raises(SelectionError, match="empty"):
        write_selection(result.selection, tmp_path / "empty.parquet")
    assert not (tmp_path / "empty.parquet").exists()
    with pytest.raises(SelectionError, match="no such"):
        read_selection(tmp_path / "missing.parquet")
