"""The `TrainedMethod` protocol and the loss registry are the plug-in points of stage two.

A toy loss (with its own config key and learnable state) and a toy method (its own heads and
batch transform, no `model` or `transform` attribute) are registered here, in this file alone,
and fitted through `alignpipe.fit.fit`: no other file changes for either. They are registered
into copies of the registries that each test drops again, so no other test sees them.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import alignpipe.fit.loop as loop_module
from alignpipe.app.synthetic import make_synthetic
from alignpipe.fit import fit, resolve_config
from alignpipe.methods import create_method, list_losses, register_loss, register_method
from alignpipe.methods.losses import LOSSES, Temperature, build_loss, symmetric_infonce
from alignpipe.methods.registry import METHODS
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry

TOY_LOSS, TOY_METHOD = "test-scaled-cosine", "test-protocol"
TINY = {"epochs": 2, "batch_size": 32, "warmup_steps": 2}


# ---- the plug-ins: written against the protocols only --------------------------------------------
class ScaledCosine:
    """A non-InfoNCE loss: mean squared error between `scale`·cos(za_i, zb_j) and the identity
    matrix, with a learnable `scale` clamped into [0.5, margin + 1] after every step."""

    calls = 0

    def __init__(self, config: dict):
        self.margin = float(config["margin"])
        self.state = nn.Module()
        self.state.scale = nn.Parameter(torch.tensor(1.0))

    def __call__(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        ScaledCosine.calls += 1
        sims = F.normalize(za.float(), dim=-1) @ F.normalize(zb.float(), dim=-1).T
        return ((self.state.scale * sims - torch.eye(za.shape[0])) ** 2).mean()

    def after_step(self) -> None:
        with torch.no_grad():
            self.state.scale.clamp_(0.5, self.margin + 1)

    def log_values(self) -> dict[str, float]:
        return {"scale": float(self.state.scale.detach())}


class MeanOfThree:
    """A batch transform drawing 3 rows per loss pair (their mean), so the trainer must take
    `rows_per_pair` from the method to size its steps."""

    rows_per_pair = 3

    def __call__(self, xa, xb):
        n = xa.shape[0] // 3
        return (xa[:n] + xa[n:2 * n] + xa[2 * n:3 * n]) / 3, (xb[:n] + xb[n:2 * n]
                                                             + xb[2 * n:3 * n]) / 3


class ProtocolMethod:
    """Implements exactly `TrainedMethod`; it has no `model` and no `transform` attribute, so a
    trainer that reached for them would fail with AttributeError."""

    trained = True
    name = TOY_METHOD

    def __init__(self, config: dict, dim_a: int, dim_b: int):
        self.config = config
        out = int(config["width"])
        self._loss = build_loss(config)  # the loss the config's `loss` key names
        self._layers = nn.ModuleDict({"left": nn.Linear(dim_a, out), "right": nn.Linear(dim_b, out),
                                      "loss": self._loss.state})
        self._mix = MeanOfThree()
        self.rows_per_pair = self._mix.rows_per_pair
        self.steps = 0

    def fit(self, train, val, loop=None) -> None:
        loop(self, train, val)

    def training_loss(self, xa, xb, rng: np.random.Generator) -> torch.Tensor:
        xa, xb = self._mix(xa.float(), xb.float())
        return self._loss(self._layers["left"](xa), self._layers["right"](xb))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self._layers.parameters()), "weight_decay": weight_decay}]

    def named_parameters(self):
        return self._layers.named_parameters()

    def train(self, mode: bool = True):
        self._layers.train(mode)
        return self

    def after_step(self) -> None:
        self.steps += 1
        self._loss.after_step()

    def log_values(self) -> dict[str, float]:
        return {"toy_steps": float(self.steps), **self._loss.log_values()}

    def step_flops(self, batch: int) -> int:
        return 6 * batch * sum(m.weight.numel() for m in self._layers.modules()
                               if isinstance(m, nn.Linear))

    def step_bytes(self, batch: int) -> int:
        return 4 * batch * 64

    @torch.no_grad()
    def encode(self, side: str, latents: torch.Tensor) -> torch.Tensor:
        layer = self._layers["left" if side == "a" else "right"]
        return F.normalize(layer(latents.float()), dim=-1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._layers.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._layers.load_state_dict(tensors)

    def to(self, device):
        self._layers.to(device)
        return self


@pytest.fixture
def plugins(monkeypatch):
    """Register the toy loss and method, as a plug-in module would, into registry copies."""
    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    register_loss(TOY_LOSS, defaults={"margin": 0.5}, description="test loss")(ScaledCosine)
    register_method(TOY_METHOD, defaults={"width": 8, "loss": TOY_LOSS, "margin": 0.5},
                    description="test method")(ProtocolMethod)
    ScaledCosine.calls = 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("protocol"), train=300, val=60, test=30,
                          dim_a=12, dim_b=8, hidden=6, private=2, classes=4)


# ---- the loss registry --------------------------------------------------------------------------
def test_infonce_is_registered_and_listed_with_wildcards():
    assert "infonce" in list_losses()
    assert list_losses("info*") == ["infonce"]
    assert list_losses("nothing*") == []
    with pytest.raises(AlignpipeError, match="unknown loss 'nope'; known: .*infonce"):
        build_loss({"loss": "nope"})


def test_infonce_loss_is_symmetric_infonce_bit_for_bit():
    """The registered loss is exactly `symmetric_infonce` at its temperature, fp32 under
    bf16 autocast too, and a method's training loss is that loss of its heads' outputs."""
    loss = build_loss(resolve_config("mlp", overrides={"temperature": 0.01}))
    assert isinstance(loss.state, Temperature)
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    assert torch.equal(loss(za, zb), symmetric_infonce(za, zb, loss.state()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss(za.bfloat16(), zb.bfloat16())
        direct = symmetric_infonce(za.bfloat16(), zb.bfloat16(), loss.state())
    assert under.dtype == torch.float32 and torch.equal(under, direct)
    method = create_method("linear", resolve_config("linear", overrides={"out_dim": 8}), 16, 16)
    got = method.training_loss(za, zb, np.random.default_rng(0))
    want = symmetric_infonce(method.model["a"](za), method.model["b"](zb), method.model["loss"]())
    assert torch.equal(got, want)
    method.model["loss"].temperature.data.fill_(9.0)
    method.after_step()  # the loss's after-step hook clamps its temperature
    assert method.log_values() == {"temperature": pytest.approx(0.5)}


def test_loss_key_is_checked_like_other_config_keys(plugins):
    assert resolve_config("mlp")["loss"] == "infonce"
    with pytest.raises(AlignpipeError, match="loss must be one of .*infonce.*got 'nope'"):
        resolve_config("fusemix", overrides={"loss": "nope"})
    with pytest.raises(AlignpipeError, match="unknown key 'loss' for method asif"):
        resolve_config("asif", overrides={"loss": "infonce"})
    # A loss's own keys exist only when it is chosen, and keep their type.
    with pytest.raises(AlignpipeError, match="unknown key 'margin'"):
        resolve_config("mlp", overrides={"margin": "0.3"})
    cfg = resolve_config("mlp", overrides={"loss": TOY_LOSS, "margin": "0.3"})
    assert cfg["margin"] == 0.3 and cfg["loss"] == TOY_LOSS
    with pytest.raises(AlignpipeError, match="config key margin: expected a number"):
        resolve_config("mlp", overrides={"loss": TOY_LOSS, "margin": "wide"})


def test_a_registered_loss_trains_a_builtin_method_through_fit(plugins, data, tmp_path):
    out = tmp_path / "run"
    fit(data.store_a, data.store_b, method="mlp", out=out, progress=False,
        overrides={**TINY, "blocks": 1, "out_dim": 8, "loss": TOY_LOSS, "margin": 0.25})
    assert ScaledCosine.calls > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all("temperature" not in m and 0.5 <= m["scale"] <= 1.25 for m in metrics)
    heads = load_file(str(out / "heads-last.safetensors"))
    assert "loss.scale" in heads and "loss.temperature" not in heads
    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["loss"] == TOY_LOSS


# ---- the method protocol ------------------------------------------------------------------------
def test_trainer_uses_only_the_protocol():
    source = inspect.getsource(loop_module)
    assert "method.model" not in source and "method.transform" not in source


def test_a_registered_method_fits_and_resumes_exactly(plugins, data, tmp_path, monkeypatch):
    overrides = {**TINY, "epochs": 3}
    whole = tmp_path / "whole"
    summary = fit(data.store_a, data.store_b, method=TOY_METHOD, out=whole, progress=False,
                  overrides=overrides)
    rows = summary.train_pairs
    assert summary.batch_size == 32 and summary.steps == 3 * (rows // (32 * 3))
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").open()]
    assert [m["toy_steps"] for m in metrics] == [summary.steps // 3 * e for e in (1, 2, 3)]
    assert set(load_file(str(whole / "heads-best.safetensors"))) == {
        "left.weight", "left.bias", "right.weight", "right.bias", "loss.scale"}

    def killed(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(loop_module, "_after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(data.store_a, data.store_b, method=TOY_METHOD, out=cut, progress=False,
            overrides=overrides)
    monkeypatch.setattr(loop_module, "_after_epoch", lambda epoch: None)
    fit(data.store_a, data.store_b, method=TOY_METHOD, out=cut, progress=False,
        overrides=overrides, resume=True)
    a, b = (load_file(str(p / "heads-last.safetensors")) for p in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generic_registry():
    kinds: Registry[int] = Registry("widget")
    kinds.register("w-one")(1)
    kinds.add("w-two", 2)
    assert kinds.names("*one") == ["w-one"] and list(kinds) == ["w-one", "w-two"]
    assert kinds.get("w-two") == 2 and "w-one" in kinds
    with pytest.raises(ValueError, match="registered twice"):
        kinds.add("w-one", 3)
    with pytest.raises(AlignpipeError, match="unknown widget 'w-3'; known: w-one, w-two"):
        kinds.get("w-3")


def test_a_run_recorded_before_the_loss_key_is_the_same_run(data, tmp_path):
    """Runs fitted before `loss` was a config key trained InfoNCE: still found as finished."""
    out = tmp_path / "old"
    overrides = {**TINY, "epochs": 1, "out_dim": 8}
    fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
        overrides=overrides)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    del recorded["config"]["loss"]
    (out / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    again = fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
                overrides=overrides)
    assert again.cached
    with pytest.raises(AlignpipeError, match="holds a different run"):
        fit(data.store_a, data.store_b, method="linear", out=out, progress=False,
            overrides={**overrides, "loss": "infonce", "temperature": 0.05})
