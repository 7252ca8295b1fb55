"""Issue 9, typed configs: one dataclass per method, loss and the training loop, resolved through
OmegaConf; unknown keys, wrong types and out-of-range values are refused by name, and the values a
pipeline's YAML gives reach the run's config.yaml with their types."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alignpipe.fit.config import TrainConfig, config_class, default_config, resolve_config
from alignpipe.methods import create_method, register_method
from alignpipe.methods.params import MAX_DIM, config_params, param
from alignpipe.methods.registry import METHODS
from alignpipe.util.errors import AlignpipeError

LOOP = ("seed: 0\nval_fraction: 0.05\nepochs: 20\nbatch_size: 20480\nlr: 0.001\n"
        "min_lr: 1.0e-06\nwarmup_start_lr: 1.0e-06\nwarmup_steps: 100\nweight_decay: 0.1\n"
        "grad_clip: 0.0\nprecision: auto\nstorage_dtype: auto\nlog_every: 10\nval_every: 1\n")
LOSS = ("loss: infonce\ntemperature: 0.07\ntemperature_min: 0.001\ntemperature_max: 0.5\n"
        "learn_temperature: true\nstandardize: false\n")
MLP = "out_dim: 512\nblocks: 4\nexpansion: 4\ndropout: 0.6\n"
# config.yaml as runs made before the typed configs recorded it: a changed key, order or type
# here would make every existing run "different" and refit it.
RECORDED = {
    "linear": LOOP + "out_dim: null\nidentity_side: null\nbias: true\n" + LOSS,
    "mlp": LOOP + MLP + LOSS,
    "fusemix": LOOP + MLP + LOSS + "alpha: 1.0\nkeep_unmixed: false\n",
    "asif": "seed: 0\nval_fraction: 0.05\ntopk: 800\npower: 8.0\n",
}


@pytest.mark.parametrize("method", sorted(RECORDED))
def test_resolved_defaults_are_written_as_before(method):
    assert yaml.safe_dump(resolve_config(method), sort_keys=False) == RECORDED[method]
    assert default_config(method) == resolve_config(method)


def test_an_unknown_key_is_refused_by_name_with_the_closest_known_keys(tmp_path):
    with pytest.raises(AlignpipeError, match=r"^--set: unknown key 'blcks' for method mlp; "
                                             r"did you mean blocks\?; known keys: batch_size"):
        resolve_config("mlp", overrides={"blcks": 2})
    path = tmp_path / "c.yaml"
    path.write_text("warmup_step: 5\n")
    with pytest.raises(AlignpipeError, match=rf"^{path}: unknown key 'warmup_step' for method "
                                             rf"fusemix; did you mean warmup_steps"):
        resolve_config("fusemix", path)
    with pytest.raises(AlignpipeError, match=r"unknown key 'zzz' for method asif; known keys"):
        resolve_config("asif", overrides={"zzz": 1})


@pytest.mark.parametrize("method, key, value, expected", [
    ("mlp", "blocks", "two", "expected an integer, got 'two'"),
    ("mlp", "blocks", 2.5, "expected an integer, got 2.5"),
    ("mlp", "standardize", 1, "expected true or false, got 1"),
    ("mlp", "precision", 5, "expected a string, got 5"),
    ("mlp", "lr", [0.1], r"expected a number, got \[0.1\]"),
    ("mlp", "lr", "", "expected a number, got None"),
    ("linear", "out_dim", "wide", "expected an integer or null, got 'wide'"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(method, key, value, expected):
    with pytest.raises(AlignpipeError, match=rf"^--set: config key {key}: {expected}$"):
        resolve_config(method, overrides={key: value})


def test_text_values_are_read_as_yaml_and_keep_the_declared_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: 3.0\nweight_decay: 0\nidentity_side: a\n")  # 1e-3: str
    cfg = resolve_config("linear", path, {"out_dim": "null", "standardize": "true",
                                          "min_lr": "2e-7", "precision": "bf16"})
    typed = {k: (cfg[k], type(cfg[k])) for k in ("lr", "epochs", "weight_decay", "out_dim",
                                                   "standardize", "min_lr", "precision")}
    assert typed == {"lr": (1e-3, float), "epochs": (3, int), "weight_decay": (0.0, float),
                     "out_dim": (None, type(None)), "standardize": (True, bool),
                     "min_lr": (2e-7, float), "precision": ("bf16", str)}
    assert cfg["identity_side"] == "a"


@pytest.mark.parametrize("method, key, value, message, inside", [
    ("mlp", "dropout", 1.0, r"dropout must be in \[0, 1\) \(got 1.0\)", 0.0),
    ("mlp", "blocks", 65, r"blocks must be in \[0, 64\] \(got 65\)", 64),
    ("mlp", "out_dim", MAX_DIM + 1, rf"out_dim must be in \[1, {MAX_DIM}\]", MAX_DIM),
    ("mlp", "lr", "nan", r"lr must be in \(0, ∞\) \(got nan\)", "1e9"),
    ("mlp", "batch_size", 1, r"batch_size must be in \[2, ∞\) \(got 1\): a contrastive loss",
     2),
    ("mlp", "precision", "fp16", r"precision must be one of auto, fp32, bf16 \(got 'fp16'\)",
     "bf16"),
    ("fusemix", "alpha", 0, r"alpha must be in \(0, ∞\) \(got 0.0\)", 1e-9),
    ("asif", "topk", 0, r"topk must be in \[1, ∞\) \(got 0\)", 1),
    ("linear", "identity_side", "c", r"identity_side must be one of a, b \(or null\)", "b"),
    ("linear", "out_dim", 0, r"out_dim must be in \[1, ", None),
])
def test_a_value_out_of_its_declared_range_is_refused(method, key, value, message, inside):
    with pytest.raises(AlignpipeError, match=rf"^fit config: {message}"):
        resolve_config(method, overrides={key: value})
    resolve_config(method, overrides={key: inside})  # the bound itself, or a value inside


def test_ranges_and_defaults_are_declared_once_on_the_fields():
    loop = {p.name: p for p in config_params(TrainConfig)}
    assert loop["epochs"].default == 20 and loop["epochs"].range.low == 1
    assert loop["precision"].choices == ("auto", "fp32", "bf16")
    keys = {p.name: p for p in config_params(config_class("fusemix", "infonce"))}
    assert keys["temperature"].range.low_open and keys["alpha"].default == 1.0
    assert list(keys) == list(resolve_config("fusemix"))


@dataclass
class WidthConfig:
    width: int = param(8, low=1, high=64, help="hidden width")
    mode: str = param("sum", choices=("sum", "mean"))
    scale: float | None = None


class Echo:
    """A training-free method that keeps its config (enough to see which keys reach it)."""

    name, trained = "toy-typed", False

    def __init__(self, config: dict, dim_a: int, dim_b: int) -> None:
        self.config = config


@pytest.fixture
def typed_plugin(monkeypatch):
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    register_method("toy-typed", config=WidthConfig, trained=False,
                    description="test method")(Echo)


def test_a_plugin_method_with_its_own_config_dataclass_gets_its_keys_checked(typed_plugin):
    assert resolve_config("toy-typed") == {"seed": 0, "val_fraction": 0.05, "width": 8,
                                           "mode": "sum", "scale": None}
    cfg = resolve_config("toy-typed", overrides={"width": "16", "scale": "1e-2"})
    assert (cfg["width"], cfg["scale"]) == (16, 0.01)
    assert create_method("toy-typed", cfg, 4, 4).config["width"] == 16
    refusals = [({"widht": 3}, r"unknown key 'widht' for method toy-typed; did you mean width"),
                ({"epochs": 3}, r"unknown key 'epochs' for method toy-typed"),  # not trained
                ({"width": 0}, r"width must be in \[1, 64\] \(got 0\)"),
                ({"mode": "max"}, r"mode must be one of sum, mean \(got 'max'\)"),
                ({"scale": "big"}, r"config key scale: expected a number or null"),
                ({"width": True}, r"config key width: expected an integer, got True")]
    for overrides, message in refusals:
        with pytest.raises(AlignpipeError, match=message):
            resolve_config("toy-typed", overrides=overrides)


def test_a_config_dataclass_the_resolver_cannot_check_is_refused_at_registration(typed_plugin):
    @dataclass
    class Listy:
        sizes: list[int] = param([1, 2])

    with pytest.raises(TypeError, match=r"Listy.sizes: config keys are int, float, bool, str"):
        register_method("listy", config=Listy)(Echo)
    with pytest.raises(TypeError, match="exactly one of config="):
        register_method("neither")(Echo)
    assert "listy" not in METHODS and "neither" not in METHODS


def test_yaml_types_of_a_pipeline_fit_step_reach_the_runs_config_yaml(tmp_path):
    from alignpipe.app.pipeline.runner import fit_runs, load_pipeline, run_pipeline

    plan = {
        "name": "typed",
        "data": {"toy": {"manifest": "data/toy.parquet",
                         "make": {"kind": "toy", "out": "data", "rows": 40, "seed": 0}}},
        "embed": {"img": {"data": "toy", "encoder": "test-vit"},
                  "txt": {"data": "toy", "encoder": "test-text"}},
        "fit": {"pair": {"method": "linear", "a": "img", "b": "txt"}},
        "eval": [],
    }
    # Written by hand: `1e-3` and `5.0e-2` in YAML 1.1 are a string and a float, `0` an int.
    text = yaml.safe_dump(plan, sort_keys=False).replace(
        "b: txt\n", "b: txt\n    set: {lr: 1e-3, temperature: 5.0e-2, weight_decay: 0, "
                    "epochs: 1, batch_size: 8, warmup_steps: 1, standardize: true, "
                    "identity_side: null, out_dim: 16}\n")
    path = tmp_path / "typed.yaml"
    path.write_text(text)
    overrides = fit_runs(load_pipeline(path), "pair")[0].overrides
    assert overrides["lr"] == "1e-3" and overrides["weight_decay"] == 0  # as YAML read them
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_pipeline(path, progress=False, echo=lambda _: None)
    finally:
        os.chdir(old)
    [config_yaml] = [p for p in Path(tmp_path).rglob("config.yaml") if p.parent.name == "pair"]
    recorded = yaml.safe_load(config_yaml.read_text())["config"]
    got = {k: (recorded[k], type(recorded[k])) for k in (
        "lr", "temperature", "weight_decay", "epochs", "standardize", "identity_side",
        "out_dim")}
    assert got == {"lr": (1e-3, float), "temperature": (0.05, float),
                   "weight_decay": (0.0, float), "epochs": (1, int), "standardize": (True, bool),
                   "identity_side": (None, type(None)), "out_dim": (16, int)}
    assert recorded == resolve_config("linear", None, overrides)
    assert list(recorded) == list(resolve_config("linear"))  # declaration order, as always
