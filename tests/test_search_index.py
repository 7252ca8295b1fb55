"""The approximate search index (alignpipe.model.index): recall against brute force, reuse,
rebuild when the store or the heads change, the missing extra, the CLI options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.synthetic import write_store
from alignpipe.data.manifest import write_manifest
from alignpipe.data.store import LatentStore, open_store
from alignpipe.fit.config import resolve_config
from alignpipe.methods import create_method
from alignpipe.model import AlignedModel
from alignpipe.model import index as ann
from alignpipe.model import search as search_module
from alignpipe.model.aligned import Side
from alignpipe.model.search import search_encoded

pytest.importorskip("usearch")

ROWS, DIM, OUT_DIM, QUERIES, K = 3000, 48, 32, 100, 10
INVALID = [3, 500, 1234, 2999]
runner = CliRunner()


def _store(folder: Path, seed: int = 0) -> LatentStore:
    """Random text latents (structureless Gaussian rows, the hard case for HNSW), a few
    invalid."""
    manifest = write_manifest(pa.table({"id": [f"r{i}" for i in range(ROWS)],
                                        "text": [f"caption {i}" for i in range(ROWS)]}),
                              folder / "m.parquet")
    latents = np.random.default_rng(seed).standard_normal((ROWS, DIM)).astype(np.float32)
    return write_store(folder / "cache" / "m" / "rand", latents, "text", "rand", manifest,
                       invalid=INVALID)


def _model(store: LatentStore, name: str = "run", seed: int = 0) -> AlignedModel:
    torch.manual_seed(seed)
    config = resolve_config("linear", {"out_dim": OUT_DIM, "standardize": False})
    method = create_method("linear", config, 24, DIM)
    image = {"name": "img", "backend": "synthetic", "dim": 24}
    sides = {"a": Side("a", "image", image), "b": Side("b", "text", store.encoder)}
    return AlignedModel(method.train(False), sides, name=name, method_name="linear",
                        device=torch.device("cpu"))


def _queries(seed: int = 1) -> torch.Tensor:
    q = torch.from_numpy(np.random.default_rng(seed).standard_normal((QUERIES, OUT_DIM)))
    return torch.nn.functional.normalize(q.float(), dim=1)


def _brute_force(model: AlignedModel, store: LatentStore, query: torch.Tensor) -> np.ndarray:
    """numpy top-k over every valid row: the reference both searches are held to."""
    with torch.no_grad():
        encoded = model.encode_latents("text", store.read()).numpy()
    scores = query.numpy() @ encoded.T
    scores[:, ~store.read_valid()] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[LatentStore, AlignedModel]:
    store = _store(tmp_path)
    return store, _model(store)


def test_index_recall_at_10_against_brute_force(setup: tuple[LatentStore, AlignedModel]) -> None:
    store, model = setup
    query = _queries()
    truth = _brute_force(model, store, query)
    exact = search_encoded(model, store, query, k=K)
    approx = search_encoded(model, store, query, k=K, index=True)
    assert [[h.row for h in hits] for hits in exact] == truth.tolist()
    recall = np.mean([len({h.row for h in a} & set(t)) / K
                      for a, t in zip(approx, truth.tolist(), strict=True)])
    assert recall >= 0.95, recall
    assert not {h.row for hits in approx for h in hits} & set(INVALID)
    # the same Hits: rank, row, id, score (within the index's float16), text
    for exact_hits, hits in zip(exact, approx, strict=True):
        by_row = {h.row: h for h in exact_hits}
        assert [h.rank for h in hits] == list(range(1, K + 1))
        for h in hits:
            assert h.id == f"r{h.row}" and h.text == f"caption {h.row}" and h.media is None
            if h.row in by_row:
                assert abs(h.score - by_row[h.row].score) < 3e-3


def test_index_is_reused_then_rebuilt_when_the_store_or_heads_change(
        setup: tuple[LatentStore, AlignedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    store, model = setup
    builds = []
    real_build = ann._build
    monkeypatch.setattr(ann, "_build", lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    query = _queries()[:5]

    def search() -> list:
        return [h.row for h in search_encoded(model, store, query, k=K, index=True)[0]]

    first = search()
    path = ann.index_path(store, model)
    assert path.parent == store.path / "indexes" and path.exists()
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["count"] == ROWS - len(INVALID) and record["metric"] == "ip"
    mtime = path.stat().st_mtime_ns
    assert search() == first and len(builds) == 1 and path.stat().st_mtime_ns == mtime

    with torch.no_grad():  # the run's heads change: rebuilt, same file name
        next(model.method.named_parameters())[1].mul_(-1.0)
    search()
    assert len(builds) == 2 and ann.index_path(store, model) == path
    search()
    assert len(builds) == 2

    # a unit of the store is rewritten: rebuilt, and the new content is what is found
    latents = store.read()
    target = int(first[0])
    latents[target] = 0.0
    store.write_unit(0, latents[:store.unit_range(0)[1]], store.read_valid()[
        :store.unit_range(0)[1]])
    reopened = open_store(store.path)
    rows = [h.row for h in search_encoded(model, reopened, query, k=K, index=True)[0]]
    assert len(builds) == 3 and target not in rows


def test_missing_extra_is_one_clear_line(setup: tuple[LatentStore, AlignedModel],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store, model = setup
    monkeypatch.setitem(sys.modules, "usearch", None)  # import usearch -> ImportError
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    with pytest.raises(ann.IndexUnavailable, match=r"pip install 'alignpipe\[index\]'"):
        search_encoded(model, store, _queries()[:2], k=K, index=True)
    monkeypatch.setattr(search_module, "AUTO_INDEX_ROWS", 10)  # auto: falls back to exact
    hits = search_encoded(model, store, _queries()[:2], k=K, index="auto")
    assert len(hits[0]) == K and not (store.path / "indexes").exists()


def test_auto_uses_the_index_only_above_the_threshold(
        setup: tuple[LatentStore, AlignedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    store, model = setup
    search_encoded(model, store, _queries()[:2], k=K, index="auto")
    assert not (store.path / "indexes").exists()
    monkeypatch.setattr(search_module, "AUTO_INDEX_ROWS", ROWS - 1)
    search_encoded(model, store, _queries()[:2], k=K, index="auto")
    assert ann.index_path(store, model).exists()


def test_cli_search_index(setup: tuple[LatentStore, AlignedModel], tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    store, model = setup
    query = _queries()[:1]
    monkeypatch.setattr(model, "encode", lambda modality, inputs, **kw: query)
    monkeypatch.setattr("alignpipe.model.load_model", lambda *a, **kw: model)
    out = {}
    for flag in ("", "--index"):
        found = tmp_path / f"hits{flag}.json"
        result = runner.invoke(app, ["search", str(tmp_path), "--store", str(store.path),
                                     "--query", "q", "--output", str(found),
                                     *([flag] if flag else [])])
        assert result.exit_code == 0, result.output
        out[flag] = json.loads(found.read_text())["results"]
    assert out[""][0].keys() == out["--index"][0].keys()
    assert len({h["row"] for h in out[""]} & {h["row"] for h in out["--index"]}) >= 8
    monkeypatch.setitem(sys.modules, "usearch", None)
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    result = runner.invoke(app, ["search", str(tmp_path), "--store", str(store.path),
                                 "--query", "q", "--index"])
    assert result.exit_code != 0 and "pip install 'alignpipe[index]'" in result.output
    assert "Traceback" not in result.output
