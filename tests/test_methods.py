"""Methods: registry, heads, loss, FuseMix mixing, optimiser groups, ASIF against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignpipe.fit import resolve_config
from alignpipe.methods import create_method, is_registered, list_methods, method_spec
from alignpipe.methods.asif import relative_topk
from alignpipe.methods.base import Pairs
from alignpipe.methods.fusemix import FuseMix
from alignpipe.methods.heads import ResidualBlock, matmul_flops_per_row, mlp_head
from alignpipe.methods.losses import Temperature, symmetric_infonce
from alignpipe.methods.space import SparseRows, group_mean, pairwise_scores
from alignpipe.util.errors import AlignpipeError


def build(name: str, dim_a: int = 12, dim_b: int = 8, **overrides):
    return create_method(name, resolve_config(name, overrides=overrides), dim_a, dim_b)


def test_registry():
    assert list_methods() == ["asif", "fusemix", "linear", "mlp"]
    assert list_methods("*l*") == ["linear", "mlp"]
    assert is_registered("fusemix") and not is_registered("fusemax")
    with pytest.raises(AlignpipeError, match="unknown method 'fusemax'; registered: asif"):
        method_spec("fusemax")
    assert not method_spec("asif").trained and method_spec("mlp").trained


def test_residual_block_is_the_fusemix_formula():
    torch.manual_seed(0)
    block = ResidualBlock(6, expansion=4, dropout=0.0).eval()
    x = torch.randn(3, 6)
    up, down = block.fn[0], block.fn[3]
    expected = x + down(F.gelu(up(F.layer_norm(x, (6,), block.ln.weight, block.ln.bias))))
    assert torch.allclose(block(x), expected, atol=1e-6)
    assert up.out_features == 24


def test_mlp_defaults_follow_the_paper():
    spec = method_spec("mlp").defaults
    assert (spec["blocks"], spec["expansion"], spec["dropout"], spec["out_dim"]) == (4, 4, 0.6, 512)
    head = mlp_head(16, 512)
    assert sum(isinstance(m, ResidualBlock) for m in head) == 4
    assert isinstance(head[-2], torch.nn.LayerNorm) and head[-1].out_features == 512
    assert method_spec("fusemix").defaults["alpha"] == 1.0


def test_symmetric_infonce_by_hand():
    torch.manual_seed(1)
    za, zb, t = torch.randn(5, 4), torch.randn(5, 4), torch.tensor(0.1)
    logits = F.normalize(za, dim=1) @ F.normalize(zb, dim=1).T / t
    by_hand = -(torch.log_softmax(logits, 1).diag().mean()
                + torch.log_softmax(logits.T, 1).diag().mean()) / 2
    assert torch.allclose(symmetric_infonce(za, zb, t), by_hand)


def test_fusemix_mixes_row_k_with_k_plus_b_with_one_shared_lambda():
    xa, xb = torch.randn(8, 3), torch.randn(8, 5)
    (ma, mb), = FuseMix(alpha=1.0)(xa, xb, np.random.default_rng(7))
    lam = np.random.default_rng(7).beta(1.0, 1.0)
    assert torch.allclose(ma, lam * xa[:4] + (1 - lam) * xa[4:])
    assert torch.allclose(mb, lam * xb[:4] + (1 - lam) * xb[4:])
    batches = FuseMix(alpha=1.0, keep_unmixed=True)(xa, xb, np.random.default_rng(7))
    assert len(batches) == 2 and batches[1][0] is xa


def test_temperature_clamped_and_weight_decay_on_matrices_only():
    method = build("fusemix", blocks=1, out_dim=4)
    method.model["loss"].temperature.data.fill_(5.0)
    method.after_step()
    assert method.model["loss"]().item() == pytest.approx(0.5)
    decay, keep = method.parameter_groups(0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is method.model["loss"].temperature for p in keep["params"])
    names = {id(p): n for n, p in method.model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    assert any(n.endswith("ln.weight") for n in kept) and any(n.endswith("bias") for n in kept)
    with pytest.raises(ValueError):
        Temperature(init=0.7)


def test_linear_identity_side():
    method = build("linear", dim_a=12, dim_b=8, identity_side="a")
    x = torch.randn(3, 12)
    assert torch.allclose(method.encode("a", x), F.normalize(x, dim=1))
    assert method.encode("b", torch.randn(3, 8)).shape == (3, 12)
    assert build("linear").encode("a", x).shape == (3, 512)
    with pytest.raises(AlignpipeError, match="out_dim must be 12"):
        build("linear", identity_side="a", out_dim=64)


def test_step_flops_of_a_linear_method():
    method = build("linear", dim_a=10, dim_b=6, out_dim=4)
    assert matmul_flops_per_row(method.model["a"]) == 2 * 10 * 4
    assert method.step_flops(3) == 3 * 3 * (80 + 48) + 6 * 9 * 4


def brute_relative(x: torch.Tensor, anchors: torch.Tensor, k: int, p: float) -> torch.Tensor:
    sims = F.normalize(x, dim=1) @ F.normalize(anchors, dim=1).T
    out = torch.zeros_like(sims)
    values, idx = sims.topk(k, dim=1)
    out.scatter_(1, idx, values.clamp_min(0) ** p)
    return F.normalize(out, dim=1)


def test_asif_matches_dense_brute_force():
    torch.manual_seed(0)
    a, b = torch.randn(50, 6), torch.randn(50, 4)
    method = build("asif", topk=7, power=3.0)
    method.fit(Pairs(a, b, np.arange(50), np.arange(50), np.arange(50)), None)
    qa, qb = torch.randn(9, 6), torch.randn(11, 4)
    ea, eb = method.encode("a", qa), method.encode("b", qb)
    dense_a, dense_b = brute_relative(qa, a, 7, 3.0), brute_relative(qb, b, 7, 3.0)
    assert torch.allclose(ea.dense(), dense_a, atol=1e-6)
    assert torch.allclose(pairwise_scores(ea, eb), dense_a @ dense_b.T, atol=1e-6)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2, 0])
    mean = group_mean(eb, groups, 3).dense()
    expected = F.normalize(torch.zeros(3, 50).index_add_(0, groups, dense_b), dim=1)
    assert torch.allclose(mean, expected, atol=1e-6)


def test_asif_blocks_give_the_same_top_k():
    torch.manual_seed(1)
    queries = F.normalize(torch.randn(20, 5), dim=1)
    anchors = F.normalize(torch.randn(300, 5), dim=1)
    v1, i1 = relative_topk(queries, anchors, 25, anchor_block=300)
    v2, i2 = relative_topk(queries, anchors, 25, anchor_block=17)
    assert torch.allclose(v1, v2) and torch.equal(i1, i2)


def test_sparse_rows_slicing_and_concatenation():
    rows = SparseRows.from_topk(torch.tensor([[0, 2], [1, 3], [4, 0]]),
                                torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), 5)
    joined = SparseRows.cat([rows.rows(0, 1), rows.rows(1, 3)])
    assert torch.equal(joined.dense(), rows.dense())
    assert torch.allclose(rows.normalized().dense().norm(dim=1), torch.ones(3))
