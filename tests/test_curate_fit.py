"""Selections as fit inputs, and the demonstration that curation pays: on the synthetic
benchmark with the target classes a minority, fitting on the curated rows beats fitting on as
many random rows on target zero-shot."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import yaml

from alignpipe.app.curation_data import make_synthetic_pool
from alignpipe.curate import (
    curate,
    random_selection,
    read_selection,
    train_rows_of,
    write_selection,
)
from alignpipe.data.manifest import read_manifest, write_manifest
from alignpipe.evaluate import evaluate
from alignpipe.fit import fit
from alignpipe.util.errors import AlignpipeError

FIT = {"epochs": 15, "batch_size": 128, "seed": 0}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    data = make_synthetic_pool(out, targets=5, distractors=35, train=2000, val=200, test=600)
    manifest = read_manifest(data.manifest)
    curated = curate(data.store_b, [data.targets], per_concept=8, device="cpu").selection
    budget = train_rows_of(curated, manifest)
    write_selection(curated, out / "curated.parquet")
    write_selection(random_selection(data.store_b, budget, seed=0), out / "random.parquet")
    return data, out, budget


def _zeroshot(data, run) -> float:
    return evaluate("zeroshot", run, [data.target_test, data.targets], split="test",
                    device="cpu").result["top1"]


def test_curated_beats_random_with_the_same_budget(pool):
    data, out, budget = pool
    labels = read_manifest(data.manifest).column("label")
    curated = read_selection(out / "curated.parquet")
    assert {labels[r] for r in curated.rows} <= set(data.target_classes)
    random = read_selection(out / "random.parquet")
    assert sum(labels[r] in data.target_classes for r in random.rows) < budget / 2
    top1 = {}
    for name in ("curated", "random"):
        summary = fit(data.store_a, data.store_b, method="linear", out=out / "runs" / name,
                      overrides=FIT, select=out / f"{name}.parquet", progress=False,
                      device="cpu")
        assert summary.train_pairs == budget
        top1[name] = _zeroshot(data, out / "runs" / name)
    assert top1["curated"] > top1["random"] + 5, top1


def test_fit_records_the_selection_and_trains_on_its_train_rows(pool):
    data, out, budget = pool
    run = out / "runs" / "record"
    summary = fit(data.store_a, data.store_b, method="linear", out=run,
                  overrides={**FIT, "epochs": 1}, select=[out / "curated.parquet"],
                  progress=False, device="cpu")
    assert summary.train_pairs == budget
    config = yaml.safe_load((run / "config.yaml").read_text())
    [record] = config["selections"]
    assert record["path"].endswith("curated.parquet") and len(record["sha256"]) == 64
    assert json.loads((run / "run.json").read_text())["selections"][0]["sha256"] == \
        record["sha256"]
    assert "training rows kept" in (run / "log.txt").read_text()
    # the same fit again is the finished run; another selection is another run
    assert fit(data.store_a, data.store_b, method="linear", out=run,
               overrides={**FIT, "epochs": 1}, select=[out / "curated.parquet"],
               progress=False, device="cpu").cached
    with pytest.raises(AlignpipeError, match="different run"):
        fit(data.store_a, data.store_b, method="linear", out=run,
            overrides={**FIT, "epochs": 1}, select=[out / "random.parquet"], progress=False,
            device="cpu")


def test_fit_refuses_a_selection_of_another_manifest(pool, tmp_path):
    data, out, _ = pool
    other = write_manifest(pa.table({"id": ["a", "b"], "text": ["x", "y"]}),
                           tmp_path / "other.parquet")
    selection = read_selection(out / "curated.parquet")
    selection.meta["pool"]["manifest_sha256"] = read_manifest(other).sha256
    write_selection(selection, tmp_path / "foreign.parquet")
    with pytest.raises(AlignpipeError, match="sha256"):
        fit(data.store_a, data.store_b, method="linear", out=tmp_path / "run",
            overrides=FIT, select=tmp_path / "foreign.parquet", progress=False, device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Another manifest embedded with the same (synthetic) encoders: freeze-align's CC3M beside
    its curated LAION."""
    from alignpipe.app.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("second"), train=300, val=40, test=40,
                          classes=40, seed=1)


def test_also_trains_on_a_second_manifest_with_the_selection_on_its_own(pool, second, tmp_path):
    data, out, budget = pool
    from alignpipe.data.pairing import train_val_rows

    extra_train = train_val_rows(read_manifest(second.manifest), 0.05)[0].size
    run = tmp_path / "mixed"
    summary = fit(data.store_a, data.store_b, method="linear", out=run,
                  overrides={**FIT, "epochs": 1}, select=out / "curated.parquet",
                  also=[(second.store_a, second.store_b)], progress=False, device="cpu")
    # the selection restricts its own pool; every train row of the other manifest is added
    assert summary.train_pairs == budget + extra_train
    alone = fit(data.store_a, data.store_b, method="linear", out=tmp_path / "alone",
                overrides={**FIT, "epochs": 1}, select=out / "curated.parquet",
                progress=False, device="cpu")
    assert summary.val_pairs == alone.val_pairs  # validation is the first pair's only
    assert len(yaml.safe_load((run / "config.yaml").read_text())["also"]) == 1
    # the same call is the finished run; without `also` it is another run
    assert fit(data.store_a, data.store_b, method="linear", out=run,
               overrides={**FIT, "epochs": 1}, select=out / "curated.parquet",
               also=[(second.store_a, second.store_b)], progress=False, device="cpu").cached
    with pytest.raises(AlignpipeError, match="different run"):
        fit(data.store_a, data.store_b, method="linear", out=run,
            overrides={**FIT, "epochs": 1}, select=out / "curated.parquet", progress=False,
            device="cpu")
    # `--resume` alone takes the saved pairs too (and the selection, given again)
    assert fit(out=run, resume=True, select=out / "curated.parquet", progress=False,
               device="cpu").cached


def test_also_refuses_swapped_sides_and_a_manifest_given_twice(pool, second, tmp_path):
    data, _, _ = pool
    with pytest.raises(AlignpipeError, match="same order"):
        fit(data.store_a, data.store_b, method="linear", out=tmp_path / "swapped",
            overrides=FIT, also=[(second.store_b, second.store_a)], progress=False,
            device="cpu")
    with pytest.raises(AlignpipeError, match="give each manifest once"):
        fit(data.store_a, data.store_b, method="linear", out=tmp_path / "twice",
            overrides=FIT, also=[(data.store_a, data.store_b)], progress=False, device="cpu")
    assert not (tmp_path / "swapped").exists() and not (tmp_path / "twice").exists()
