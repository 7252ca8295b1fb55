"""Linear CKA against its textbook formula and invariances; mutual kNN; the similarity verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.results import similarity_to
from alignpipe.app.synthetic import make_synthetic
from alignpipe.evaluate.similarity import linear_cka, mutual_knn, similarity
from alignpipe.util.errors import AlignpipeError

runner = CliRunner()


def textbook_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels, centring H = I - 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(gram_x, gram_y):
        return np.trace(gram_x @ h @ gram_y @ h) / (n - 1) ** 2

    gx, gy = x @ x.T, y @ y.T
    return hsic(gx, gy) / np.sqrt(hsic(gx, gx) * hsic(gy, gy))


@pytest.mark.parametrize("n,dx,dy", [(50, 8, 12), (20, 40, 30)])  # both code paths
def test_cka_matches_textbook(n, dx, dy):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, dx))
    y = x[:, :min(dx, dy)] @ rng.standard_normal((min(dx, dy), dy)) + rng.standard_normal((n, dy))
    assert linear_cka(x, y) == pytest.approx(textbook_cka(x, y), abs=1e-10)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


def test_cka_invariances():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16))
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)           # rotation
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-10)         # isotropic scale
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-10)         # translation
    stretched = x * np.r_[np.full(8, 10.0), np.ones(8)]
    assert linear_cka(x, stretched) < 0.99                                  # anisotropic: no
    assert linear_cka(x, rng.standard_normal((200, 16))) < 0.3


def test_mutual_knn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    assert mutual_knn(x, x @ q * 3, k=5) == pytest.approx(1.0)
    y = rng.standard_normal((60, 7))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)

    def knn(z):
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row)[:4]) for row in s]

    expected = np.mean([len(a & b) / 4 for a, b in zip(knn(xn), knn(yn), strict=True)])
    assert mutual_knn(x, y, k=4) == pytest.approx(expected)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("sim"), train=150, val=20, test=30, dim_a=24,
                          dim_b=16, hidden=8, private=4, captions_per_item=2)


def test_similarity_outputs(data, tmp_path):
    out = tmp_path / "sim.json"
    result = similarity_to(out, [data.store_a, data.store_b, data.store_a], sample=100, k=5)
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").exists()
    cka, knn = np.array(result["linear_cka"]), np.array(result["mutual_knn"])
    assert np.allclose(np.diag(cka), 1) and np.allclose(cka, cka.T)
    assert cka[0, 2] == pytest.approx(1.0) and knn[0, 2] == pytest.approx(1.0)
    assert 0 < cka[0, 1] < 1 and 0 <= knn[0, 1] < 1
    # one row per image: 200 images of 2 captions each are 200 eligible rows, not 400
    assert result["eligible_rows"] == 200 and result["sample"] == 100


def test_similarity_refuses_other_manifests(data, tmp_path):
    other = make_synthetic(tmp_path / "other", train=20, val=5, test=5, dim_a=8, dim_b=8,
                           hidden=4, private=2, seed=1)
    with pytest.raises(AlignpipeError, match="different manifests"):
        similarity([data.store_a, other.store_b])


def test_similarity_cli(data, tmp_path):
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["similarity", str(data.store_a), str(data.store_b),
                                 "--sample", "80", "--k", "5", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "linear CKA" in result.output and out.exists()
    assert json.loads(out.read_text())["stores"] == [str(data.store_a), str(data.store_b)]
