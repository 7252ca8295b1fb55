"""Issue 8, metrics and eval: non-finite scores are misses, ImageNet's repeated class names stay
apart, no split means no test rows, results name the heads and options that produced them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from alignpipe.evaluate.metrics import (
    Links,
    chunked_ranks,
    class_ranks,
    encoded_ranks,
    nonfinite_rows,
    pessimistic_predictions,
    positive_ranks,
    recall_at_k,
    zeroshot_metrics,
)

runner = CliRunner()
NAN, INF = float("nan"), float("inf")


# ---- item 1: non-finite scores are misses -------------------------------------------------------
def brute_rank(scores, positive) -> int:
    """Sort candidates best first, non-finite as the worst score, negatives first among equals."""
    worst = [s if math.isfinite(s) else -math.inf for s in scores]
    order = sorted(range(len(scores)), key=lambda j: (-worst[j], bool(positive[j])))
    return 1 + next(i for i, j in enumerate(order) if positive[j])


def with_nonfinite(rng, shape, fraction=0.3):
    scores = rng.integers(0, 4, size=shape).astype(np.float32)  # many ties
    mask = rng.random(shape) < fraction
    scores[mask] = rng.choice(np.array([NAN, INF, -INF], np.float32), size=int(mask.sum()))
    return scores


def test_positive_and_class_ranks_match_brute_force_with_nan_and_inf():
    rng = np.random.default_rng(0)
    for _ in range(40):
        q, c = rng.integers(1, 8), rng.integers(2, 12)
        scores = with_nonfinite(rng, (q, c))
        positive = rng.random((q, c)) < 0.3
        positive[np.arange(q), rng.integers(0, c, size=q)] = True
        ranks = positive_ranks(torch.from_numpy(scores), torch.from_numpy(positive))
        assert ranks.tolist() == [brute_rank(scores[i], positive[i]) for i in range(q)]
        labels = rng.integers(0, c, size=q)
        cranks = class_ranks(torch.from_numpy(scores), torch.from_numpy(labels))
        assert cranks.tolist() == [brute_rank(scores[i], np.arange(c) == labels[i])
                                   for i in range(q)]
        preds = pessimistic_predictions(torch.from_numpy(scores), torch.from_numpy(labels))
        assert ((preds.numpy() == labels) == (cranks.numpy() == 1)).all()


def test_all_nan_scores_are_total_misses():
    nan = torch.full((5, 5), NAN)
    assert recall_at_k(nan, torch.eye(5, dtype=torch.bool), ks=(1, 4, 5)) == {
        "R@1": 0.0, "R@4": 0.0, "R@5": 100.0}              # only K = every candidate reaches
    labels = torch.arange(5)
    assert class_ranks(nan, labels).tolist() == [5] * 5    # the rank of a total miss
    assert not (pessimistic_predictions(nan, labels) == labels).any()
    metrics = zeroshot_metrics(class_ranks(nan, labels), labels, list("abcde"), ks=(1, 4))
    assert metrics["top1"] == 0.0 and metrics["top4"] == 0.0
    # one NaN positive among finite negatives ranks below all of them; +inf is no better
    assert positive_ranks(torch.tensor([[NAN, 0.1, -5.0], [INF, 0.1, -5.0]]),
                          torch.tensor([[True, False, False]] * 2)).tolist() == [3, 3]
    # a NaN negative does not push a finite positive down
    assert positive_ranks(torch.tensor([[NAN, 0.1, INF]]),
                          torch.tensor([[False, True, False]])).tolist() == [1]


def test_nan_encodings_score_zero_and_are_counted():
    enc_a = torch.full((6, 4), NAN)
    enc_b = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    forward, backward = encoded_ranks(enc_a, enc_b, np.arange(6), np.arange(6), chunk=4)
    assert forward.tolist() == [6] * 6 and backward.tolist() == [6] * 6
    links = Links.from_rows(np.arange(6), np.arange(6))
    assert chunked_ranks(lambda s, e: torch.full((e - s, 6), NAN), links, 4).tolist() == [6] * 6
    enc_b[2, 1] = INF
    assert nonfinite_rows(enc_a) == 6 and nonfinite_rows(enc_b) == 1
    assert nonfinite_rows(torch.zeros(0, 4)) == 0
    from alignpipe.methods.space import SparseRows

    sparse = SparseRows.from_topk(torch.tensor([[0, 1], [1, 2], [0, 2]]),
                                  torch.tensor([[1.0, NAN], [0.5, 0.5], [INF, 1.0]]), 3)
    assert nonfinite_rows(sparse) == 2


# ---- eval fixtures ------------------------------------------------------------------------------
def stores_from(folder, columns: dict, latents: dict, names: dict | None = None) -> dict:
    """A manifest with `columns` and one store per modality in `latents`."""
    from alignpipe.app.synthetic import write_store
    from alignpipe.data.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(pa.table(columns), folder / "m.parquet")
    return {modality: write_store(folder / (names or {}).get(modality, f"enc-{modality}"),
                                  np.asarray(values, np.float32), modality, f"enc-{modality}",
                                  manifest).path
            for modality, values in latents.items()}


def classify(folder, queries, query_cols: dict, prompts, prompt_cols: dict):
    n, m = len(queries), len(prompts)
    q = stores_from(folder / "q", {"id": [f"q{i}" for i in range(n)],
                                   "image": [f"i{i}" for i in range(n)],
                                   "split": ["test"] * n, **query_cols}, {"image": queries})
    p = stores_from(folder / "p", {"id": [f"p{i}" for i in range(m)],
                                   "text": [f"t{i}" for i in range(m)], **prompt_cols},
                    {"text": prompts})
    return q["image"], p["text"]


# ---- item 3: classes keyed by class_id ----------------------------------------------------------
def test_two_classes_of_one_name_stay_apart_by_class_id(tmp_path):
    from alignpipe.app.results import eval_zeroshot

    u, v, w = np.eye(3)
    queries = {"label": ["missile", "missile", "tank"], "class_id": ["n1", "n2", "n3"]}
    # the prompts of n1 look like n2's query and the other way round: a swap inside the pair
    swapped = {"label": ["missile", "missile", "tank"], "class_id": ["n2", "n1", "n3"]}
    q, p = classify(tmp_path / "swap", [u, v, w], queries, [u, v, w], swapped)
    result = eval_zeroshot(None, q, p, identity=True, output=tmp_path / "swap.json")
    assert result["classes"] == 3 and result["class_key"] == "class_id"
    assert result["top1"] == pytest.approx(100 / 3)          # only "tank" is right
    assert result["per_class_accuracy"] == {"missile (n1)": 0.0, "missile (n2)": 0.0,
                                            "tank": 100.0}
    q, p = classify(tmp_path / "right", [u, v, w], queries, [u, v, w], queries)
    assert eval_zeroshot(None, q, p, identity=True, output=tmp_path / "r.json")["top1"] == 100.0
    # without class_id in the prompts, classes are keyed by label (and the result says so)
    q, p = classify(tmp_path / "label", [u, v, w], queries, [u, v, w],
                    {"label": swapped["label"]})
    merged = eval_zeroshot(None, q, p, identity=True, output=tmp_path / "l.json")
    assert merged["classes"] == 2 and merged["class_key"] == "label"
    assert any("keyed by label" in w for w in merged["warnings"])


def test_imagenet_builders_write_the_wnid_as_class_id(tmp_path):
    from alignpipe.data.builders import build_imagenet, build_prompts
    from alignpipe.data.manifest import read_manifest

    missiles = ("n03773504", "n04008634")
    for i, wnid in enumerate(missiles):
        folder = tmp_path / "val" / wnid
        folder.mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (4, 4)).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG")
    images = read_manifest(build_imagenet(tmp_path / "val", tmp_path / "i.parquet").path)
    assert images.column("label") == ["missile", "missile"]
    assert images.column("class_id") == list(missiles)
    prompts = read_manifest(build_prompts(tmp_path / "p.parquet", "imagenet", "photo").path)
    assert prompts.has("class_id") and len(set(prompts.column("class_id"))) == 1000


# ---- item 7: no split column, no test rows ------------------------------------------------------
def test_split_test_without_a_split_column_is_refused(tmp_path):
    from alignpipe.app.results import eval_retrieval
    from alignpipe.app.synthetic import make_synthetic
    from alignpipe.fit import fit
    from alignpipe.util.errors import AlignpipeError

    data = make_synthetic(tmp_path / "d", train=40, val=10, test=10, dim_a=8, dim_b=8,
                          hidden=4, private=2, split_column=False)
    run = tmp_path / "runs" / "asif"
    fit(data.store_a, data.store_b, method="asif", out=run, overrides={"topk": 8},
        progress=False)
    with pytest.raises(AlignpipeError, match=r"has no split column, so it has no 'test' rows; "
                                             r"ask for split 'all' .*to score every row "
                                             r"\(including the rows the run in .*asif was"):
        eval_retrieval(run, data.store_a, data.store_b, output=tmp_path / "x.json")
    with pytest.raises(AlignpipeError, match=r"has no split column"):     # no run: still no test
        eval_retrieval(None, data.store_a, data.store_b, identity=True, split="test")
    everything = eval_retrieval(run, data.store_a, data.store_b, split="all",
                                output=tmp_path / "all.json")
    assert everything["pairs"] == 60 and "including the rows the run in" in everything["split"]
    assert any("not a held-out number" in w for w in everything["warnings"])
    with pytest.raises(AlignpipeError, match="unknown split 'tset'"):
        eval_retrieval(run, data.store_a, data.store_b, split="tset")
    result = runner.invoke(_app(), ["eval", "retrieval", str(data.store_a), str(data.store_b),
                                    "--run", str(run)])
    assert result.exit_code == 2 and "--split all" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def _app():
    from alignpipe.app.cli import app

    return app


# ---- items 1, 9, 24: what a result says about itself, and where it goes -------------------------
def test_nan_encodings_in_an_eval_score_zero_and_are_reported(tmp_path, monkeypatch):
    import alignpipe.evaluate.retrieval as evaluate
    from alignpipe.app.results import eval_retrieval

    n = 6
    stores = stores_from(tmp_path, {"id": [f"r{i}" for i in range(n)],
                                    "image": [f"i{i}" for i in range(n)],
                                    "text": [f"t{i}" for i in range(n)], "split": ["test"] * n},
                         {"image": np.eye(n), "text": np.eye(n)})
    clean = eval_retrieval(None, stores["image"], stores["text"], identity=True,
                           output=tmp_path / "clean.json")
    assert clean["mean_recall"] == 100.0 and clean["nonfinite_rows"] == {"image": 0, "text": 0}
    encode = evaluate._encode_rows

    def diverged(fn, store, rows, device):
        out = encode(fn, store, rows, device)
        return torch.full_like(out, NAN) if store.modality == "image" else out

    monkeypatch.setattr(evaluate, "_encode_rows", diverged)
    result = eval_retrieval(None, stores["image"], stores["text"], identity=True,
                            output=tmp_path / "nan.json")
    assert result["image_to_text"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 100.0}  # 6 candidates
    assert result["text_to_image"]["R@1"] == 0.0 and result["mean_recall"] < 34
    assert result["nonfinite_rows"] == {"image": n, "text": 0}
    assert any("6 of 6 image" in w for w in result["warnings"])
    assert "non-finite" in (tmp_path / "nan.md").read_text()


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    from alignpipe.app.synthetic import make_synthetic
    from alignpipe.fit import fit

    root = tmp_path_factory.mktemp("trust-eval")
    data = make_synthetic(root / "d", train=60, val=10, test=12, dim_a=8, dim_b=6, hidden=4,
                          private=2, classes=3, templates=2)
    run = root / "runs" / "lin"
    fit(data.store_a, data.store_b, method="linear", out=run,
        overrides={"epochs": 1, "batch_size": 16, "out_dim": 4}, progress=False)
    return data, run


def test_results_record_the_heads_they_scored(linear_run):
    from alignpipe.app.results import eval_retrieval
    from alignpipe.data.manifest import file_sha256

    data, run = linear_run
    result = eval_retrieval(run, data.store_a, data.store_b)
    saved = json.loads(Path(result["output"]).read_text())
    assert saved["heads"] == {"file": "heads-best.safetensors",
                              "sha256": file_sha256(run / "heads-best.safetensors")}
    assert saved["method"] == "linear" and saved["run_name"] == "lin"
    assert file_sha256(run / "heads-best.safetensors")[:16] in Path(
        result["output"]).with_suffix(".md").read_text()


def test_results_are_named_by_what_produced_them(linear_run, tmp_path, monkeypatch):
    from alignpipe.app.results import eval_retrieval, eval_zeroshot
    from alignpipe.util.errors import AlignpipeError

    data, run = linear_run
    mean = eval_zeroshot(run, data.store_a, data.prompts_store)
    best = eval_zeroshot(run, data.store_a, data.prompts_store, class_embedding="max")
    paths = {Path(mean["output"]), Path(best["output"])}
    assert len(paths) == 2 and all(p.parent == run and p.exists() for p in paths)
    assert Path(mean["output"]).name == ("eval-zeroshot-test-mean__synthetic-synthetic-a__"
                                         "prompts-synthetic-b.json")
    assert json.loads(Path(mean["output"]).read_text())["class_embedding"] == "mean"  # kept
    # the two stores swapped: refused, whatever the split
    for split in ("test", "all"):
        with pytest.raises(AlignpipeError, match="looks like a prompts store given as the query"):
            eval_zeroshot(run, data.prompts_store, data.store_a, split=split)
    # every eval says where it wrote
    result = runner.invoke(_app(), ["eval", "zeroshot", str(data.store_a),
                                    str(data.prompts_store), "--run", str(run),
                                    "--class-embedding", "max"])
    assert result.exit_code == 0, result.output
    assert f"wrote {best['output']}" in "".join(result.output.split("\n"))
    # stores of another cache that share the default name do not replace the result
    monkeypatch.chdir(tmp_path)
    for root in ("one", "two"):
        stores = stores_from(tmp_path / root / "toy", {"id": ["a", "b"], "image": ["x", "y"],
                                                       "text": ["p", "q"], "split": ["test"] * 2},
                             {"image": np.eye(2), "text": np.eye(2)})
        if root == "one":
            first = eval_retrieval(None, stores["image"], stores["text"], identity=True)
            assert Path(first["output"]).parent == tmp_path
            assert Path(first["output"]).name == ("eval-retrieval-test-identity__toy-enc-image__"
                                                  "toy-enc-text.json")
            again = eval_retrieval(None, stores["image"], stores["text"], identity=True)
            assert again["output"] == first["output"]          # a rerun replaces its own file
    with pytest.raises(AlignpipeError, match="holds the result of another eval.*--output"):
        eval_retrieval(None, stores["image"], stores["text"], identity=True)
