"""`alignpipe eval`: retrieval with multi-caption items and zero-shot, on runs and --identity."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.results import eval_retrieval, eval_zeroshot
from alignpipe.app.synthetic import make_synthetic, write_store
from alignpipe.data.manifest import write_manifest
from alignpipe.fit import fit
from alignpipe.util.errors import AlignpipeError

runner = CliRunner()


def stores_from(folder, columns: dict, latents: dict, invalid: dict | None = None,
                names: dict | None = None) -> dict:
    """A manifest with `columns` and one store per modality in `latents`."""
    manifest = write_manifest(pa.table(columns), folder / "m.parquet")
    out = {}
    for modality, values in latents.items():
        name = (names or {}).get(modality, f"enc-{modality}")
        out[modality] = write_store(folder / name, np.asarray(values, np.float32), modality,
                                    name, manifest, (invalid or {}).get(modality)).path
    return out


def multi_caption(folder, captions=(1, 2, 3, 1, 2, 1), dim=8, noise=0.1, seed=0, **kw):
    rng = np.random.default_rng(seed)
    image_of = np.repeat(np.arange(len(captions)), captions)
    images = np.eye(len(captions), dim)
    text = images[image_of] + noise * rng.standard_normal((image_of.size, dim))
    columns = {"id": [f"r{i}" for i in range(image_of.size)],
               "image": [f"img/{i}.png" for i in image_of],
               "text": [f"caption {r}" for r in range(image_of.size)],
               "split": ["test"] * image_of.size}
    return stores_from(folder, columns, {"image": images[image_of], "text": text}, **kw), image_of


def test_identity_retrieval_counts_an_image_once(tmp_path):
    stores, _ = multi_caption(tmp_path)
    result = eval_retrieval(None, stores["image"], stores["text"], identity=True,
                            output=tmp_path / "r.json")
    assert result["image_to_text"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert result["text_to_image"]["R@1"] == 100.0
    assert result["items"] == {"image": 6, "text": 10} and result["pairs"] == 10
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert (tmp_path / "r.md").exists() and (tmp_path / "r.png").exists()
    assert "| image to text | 100.00 | 100.00 | 100.00 |" in (tmp_path / "r.md").read_text()


def test_retrieval_matches_brute_force_with_groups_and_invalid_rows(tmp_path):
    rng = np.random.default_rng(5)
    captions = rng.integers(1, 5, size=40)
    image_of = np.repeat(np.arange(40), captions)
    n = image_of.size
    images = rng.standard_normal((40, 6))
    text = images[image_of] + 1.5 * rng.standard_normal((n, 6))
    invalid = {"image": [0, 7], "text": [3, n - 1]}
    columns = {"id": [f"r{i}" for i in range(n)], "image": [f"i{i}" for i in image_of],
               "text": [f"t{r}" for r in range(n)], "split": ["test"] * n}
    stores = stores_from(tmp_path, columns, {"image": images[image_of], "text": text}, invalid)
    result = eval_retrieval(None, stores["image"], stores["text"], identity=True,
                            output=tmp_path / "r.json")

    keep = np.setdiff1d(np.arange(n), [0, 7, 3, n - 1])
    img16 = images.astype(np.float16).astype(np.float64)        # stores keep float16
    txt16 = text.astype(np.float16).astype(np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    img_ids = np.unique(image_of[keep])
    sims = unit(img16[img_ids]) @ unit(txt16[keep]).T              # images × kept captions
    owner = image_of[keep]
    i2t = [1 + int((sims[i, owner != g] >= sims[i, owner == g].max()).sum())
           for i, g in enumerate(img_ids)]
    t2i = [1 + int((np.delete(sims[:, t], i) >= sims[i, t]).sum())
           for t, i in enumerate(np.searchsorted(img_ids, owner))]
    for key, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in (1, 5, 10):
            assert result[key][f"R@{k}"] == pytest.approx(100 * np.mean(np.array(ranks) <= k))
    assert result["dropped_invalid"] == 4 and result["pairs"] == keep.size


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_synthetic(root, train=300, val=50, test=80, dim_a=24, dim_b=16, hidden=8,
                          private=4, classes=4, templates=3, captions_per_item=2)
    runs = {}
    for method, overrides in (("mlp", {"epochs": 3, "batch_size": 64, "blocks": 1,
                                       "out_dim": 16}),
                              ("asif", {"topk": 50})):
        runs[method] = root / "runs" / method
        fit(data.store_a, data.store_b, method=method, out=runs[method], overrides=overrides,
            progress=False)
    return data, runs


@pytest.mark.parametrize("method", ["mlp", "asif"])
def test_retrieval_through_the_cli(fitted, method):
    data, runs = fitted
    result = runner.invoke(app, ["eval", "retrieval", str(data.store_a), str(data.store_b),
                                 "--run", str(runs[method])])
    assert result.exit_code == 0, result.output
    assert "image to text" in result.output
    stem = "eval-retrieval-test__synthetic-synthetic-a__synthetic-synthetic-b"
    saved = json.loads((runs[method] / f"{stem}.json").read_text())
    assert saved["method"] == method and saved["items"] == {"image": 80, "text": 160}
    for name in (f"{stem}.md", f"{stem}.png"):
        assert (runs[method] / name).exists()
    assert f"wrote {runs[method] / stem}.json" in " ".join(result.output.split())
    # the stores in the other order: the same numbers under swapped names
    swapped = eval_retrieval(runs[method], data.store_b, data.store_a,
                             output=runs[method] / "swapped.json")
    assert swapped["text_to_image"] == saved["text_to_image"]
    assert swapped["image_to_text"] == saved["image_to_text"]


@pytest.mark.parametrize("method,protocol", [("mlp", "mean"), ("asif", "max")])
def test_zeroshot_through_the_cli(fitted, method, protocol, tmp_path):
    data, runs = fitted
    out = tmp_path / "z.json"
    result = runner.invoke(app, ["eval", "zeroshot", str(data.store_a), str(data.prompts_store),
                                 "--run", str(runs[method]), "--class-embedding", protocol,
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["class_embedding"] == protocol and saved["classes"] == 4
    assert saved["queries"] == 80                          # each image once, not per caption
    assert set(saved["per_class_accuracy"]) <= set(data.classes)
    assert saved["top1"] > 25 and saved["top5"] == 100.0   # 4 classes: top-5 covers all
    assert out.with_suffix(".png").exists() and out.with_suffix(".md").exists()


def zeroshot_stores(folder, queries, query_labels, prompts, prompt_labels):
    q = stores_from(folder / "q", {"id": [f"q{i}" for i in range(len(queries))],
                                   "image": [f"i{i}" for i in range(len(queries))],
                                   "label": query_labels, "split": ["test"] * len(queries)},
                    {"image": queries})
    p = stores_from(folder / "p", {"id": [f"p{i}" for i in range(len(prompts))],
                                   "text": [f"t{i}" for i in range(len(prompts))],
                                   "label": prompt_labels}, {"text": prompts})
    return q["image"], p["text"]


def test_mean_and_max_protocols_differ_as_defined(tmp_path):
    u, v, z = np.eye(3)
    w = 0.8 * u + 0.6 * z
    # class A has templates u and v; class B has w twice. The query is u, labelled A.
    # mean: A scores u·(u+v)/√2 = 0.71 < B's 0.8 → wrong.  max: A scores u·u = 1 → right.
    q, p = zeroshot_stores(tmp_path, [u], ["A"], [u, v, w, w], ["A", "A", "B", "B"])
    mean = eval_zeroshot(None, q, p, identity=True, output=tmp_path / "mean.json")
    best = eval_zeroshot(None, q, p, identity=True, class_embedding="max",
                         output=tmp_path / "max.json")
    assert (mean["top1"], best["top1"]) == (0.0, 100.0)
    assert mean["per_class_accuracy"] == {"A": 0.0}
    assert "CLIP" in mean["protocol"] and "ASIF" in best["protocol"]


def test_zeroshot_refusals(tmp_path):
    q, p = zeroshot_stores(tmp_path / "a", [[1, 0], [0, 1]], ["A", "C"], [[1, 0], [0, 1]],
                           ["A", "B"])
    with pytest.raises(AlignpipeError, match="1 query label.*'C'"):
        eval_zeroshot(None, q, p, identity=True, output=tmp_path / "z.json")
    with pytest.raises(AlignpipeError, match="mean \\(CLIP\\) or max \\(ASIF\\)"):
        eval_zeroshot(None, q, p, identity=True, class_embedding="median")
    with pytest.raises(AlignpipeError, match="give a run folder"):
        eval_zeroshot(None, q, p)


def test_eval_refusals(fitted, tmp_path):
    data, runs = fitted
    with pytest.raises(AlignpipeError, match="not a run folder"):
        eval_retrieval(tmp_path, data.store_a, data.store_b)
    # same modality and dims, another encoder: refused by name
    stores, _ = multi_caption(tmp_path / "m", captions=(1, 1, 1), dim=24,
                              names={"image": "other-image", "text": "other-text"})
    with pytest.raises(AlignpipeError, match="another encoder than the run's a side"):
        eval_retrieval(runs["mlp"], stores["image"], stores["text"])
    audio = make_synthetic(tmp_path / "au", train=10, val=2, test=5, dim_a=24, dim_b=16,
                           hidden=4, private=2, modalities=("audio", "text"))
    with pytest.raises(AlignpipeError, match="holds audio latents but run .* aligns image"):
        eval_retrieval(runs["mlp"], audio.store_a, audio.store_b)
    result = runner.invoke(app, ["eval", "retrieval", str(data.store_a), str(data.store_b),
                                 "--identity"])
    assert result.exit_code == 2 and "dims must match" in result.output
