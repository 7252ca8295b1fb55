"""Fit configs: one dataclass per part, a YAML file and ``key=value`` overrides, type-checked.

The keys of a run are those of `CommonConfig`, of `TrainConfig` (trained methods only), of the
method's config dataclass (``register_method(name, config=...)``) and of its loss's
(``register_loss``), each declared once with its type, default and range (methods/params.py).
`resolve_config` merges defaults ← a saved run's config ← a config file ← overrides as OmegaConf
structured configs: an unknown key is refused by name with the closest known keys, a value of
the wrong type names the key and the type it needs, and a value out of range says the range.
Text values (``--set k=v``, or YAML's ``1e-3``, which YAML reads as a string) are parsed as YAML
for keys that are not strings, so ``--set k=v`` and ``k: v`` in a file give the same value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignpipe.methods import method_spec
from alignpipe.methods.losses import list_losses, loss_spec
from alignpipe.methods.params import (
    MAX_BLOCKS,
    MAX_DIM,
    MAX_EPOCHS,
    MAX_EXPANSION,
    Param,
    compose,
    config_defaults,
    config_params,
    param,
)
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.yamlsafe import load_yaml

__all__ = ["COMMON_DEFAULTS", "MAX_BLOCKS", "MAX_DIM", "MAX_EPOCHS", "MAX_EXPANSION",
           "PRECISIONS", "STORAGE_DTYPES", "TRAIN_DEFAULTS", "CommonConfig", "TrainConfig",
           "config_class", "default_config", "resolve_config"]

PRECISIONS = ("auto", "fp32", "bf16")
STORAGE_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class CommonConfig:
    """Keys every method understands."""

    seed: int = param(0, help="seeds torch and the batch order")
    val_fraction: float = param(0.05, low=0, high=1, high_open=True,
                                help="held out by hash of id when the manifest has no val split")


@dataclass
class TrainConfig:
    """Keys of the training loop (trained methods only); defaults follow the FuseMix release."""

    epochs: int = param(20, low=1, high=MAX_EPOCHS)
    batch_size: int = param(20480, low=2, note="a contrastive loss needs two pairs per batch",
                            help="loss pairs per step (FuseMix: 2× this many rows are drawn)")
    lr: float = param(1.0e-3, low=0, low_open=True, help="peak learning rate")
    min_lr: float = param(1.0e-6, low=0, help="where the cosine ends")
    warmup_start_lr: float = param(1.0e-6, low=0, help="where the linear warmup starts")
    warmup_steps: int = param(100, low=0)
    weight_decay: float = param(0.1, low=0, help="AdamW's, on weight matrices only")
    grad_clip: float = param(0.0, low=0, help="max grad norm; 0 = off")
    precision: str = param("auto", choices=PRECISIONS,
                           help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    storage_dtype: str = param("auto", choices=STORAGE_DTYPES,
                               help="latents on the device; auto: fp16 on GPU, fp32 on CPU")
    log_every: int = param(10, low=1, help="steps between progress-bar loss updates")
    val_every: int = param(1, low=1,
                           help="epochs between validations (= checkpoints); the last always")


COMMON_DEFAULTS = config_defaults(CommonConfig)
TRAIN_DEFAULTS = config_defaults(TrainConfig)
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def config_class(method: str, loss: str | None = None) -> type:
    """The dataclass of every key a run of `method` reads: the common keys, the loop's (when
    trained), the method's and, when `loss` is given, that loss's (a key the method declares
    itself keeps the method's declaration)."""
    spec = method_spec(method)
    parts = (CommonConfig, *((TrainConfig,) if spec.trained else ()), spec.config,
             *((loss_spec(loss).config,) if loss is not None else ()))
    return _composed(method, parts)


@lru_cache(maxsize=128)
def _composed(method: str, parts: tuple[type, ...]) -> type:
    return compose(f"{method}_fit_config", parts)


@lru_cache(maxsize=128)
def _structured(schema: type) -> DictConfig:
    # Built once per schema (the slow part of a resolve) and never changed: a merge copies it.
    return OmegaConf.structured(schema)


def default_config(method: str) -> dict[str, Any]:
    """Every key of `method` with its default (its default loss's keys included)."""
    return config_defaults(config_class(method, _chosen_loss(method, ())))


def resolve_config(method: str, config: str | Path | dict | None = None,
                   overrides: dict | None = None, base: dict | None = None) -> dict[str, Any]:
    """Defaults ← `base` (a saved run's config) ← `config` (a YAML file or a mapping) ←
    `overrides` (``--set`` and the common flags), type- and range-checked, keys in declaration
    order (the order config.yaml records them in)."""
    file_label = str(config) if isinstance(config, (str, Path)) else "fit config"
    sources = (("saved run config", dict(base or {})),
               (file_label, _config_file(config, method)),
               ("--set", dict(overrides or {})))
    schema = config_class(method, _chosen_loss(method, sources))
    params = {p.name: p for p in config_params(schema)}
    merged = _structured(schema)
    for source, values in sources:
        typed = {}
        for key, value in values.items():
            if key not in params:
                raise AlignpipeError(f"{source}: unknown key {key!r} for method {method}"
                                     f"{_did_you_mean(key, params)}; known keys: "
                                     f"{', '.join(sorted(params))}")
            typed[key] = _typed(source, params[key], value)
        if typed:
            merged = _merge(merged, typed, source)
    resolved = OmegaConf.to_container(merged, resolve=False)
    problems = [why for p in params.values() for why in [p.problem(resolved[p.name])] if why]
    if problems:
        raise AlignpipeError("fit config: " + "; ".join(problems))
    return resolved


def _config_file(config: str | Path | dict | None, method: str) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        data = dict(config)
    else:
        path = Path(config)
        if not path.exists():
            raise AlignpipeError(f"{path}: fit config file not found")
        data = load_yaml(path)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise AlignpipeError(f"{path}: a fit config is a mapping of key: value")
    named = data.pop("method", method)
    if named != method:
        raise AlignpipeError(f"fit config is for method {named!r} but --method is {method!r}")
    return data


def _chosen_loss(method: str, sources: tuple) -> str | None:
    """The loss whose keys a run of `method` also has: the method's ``loss`` default, or the
    last source that sets it; None for a method without a loss key or a loss that is not text
    (refused by type later)."""
    own = {p.name: p for p in config_params(config_class(method))}
    if "loss" not in own:
        return None
    name = own["loss"].default
    for _, values in sources:
        name = values.get("loss", name)
    if not isinstance(name, str):
        return None
    if name not in list_losses():
        raise AlignpipeError(f"fit config: loss must be one of {', '.join(list_losses())} "
                             f"(got {name!r})")
    return name


def _did_you_mean(key: object, known: dict) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _typed(source: str, p: Param, value: Any) -> Any:
    """`value` as the key's declared type: text parsed as YAML for keys that are not strings
    (``1e-3``, which YAML leaves a string, read as a number), an integral float for an integer
    key; anything else of the wrong type is refused, naming the key and the type."""
    if isinstance(value, str) and p.kind is not str:
        text = value
        where = f"--set {p.name}" if source == "--set" else f"{source}: {p.name}"
        value = load_yaml(value, where) if value != "" else None
        if isinstance(value, str) and p.kind in (int, float):
            try:
                value = float(text)
            except ValueError:
                pass
    if value is None and p.optional or p.kind is Any:
        return value
    if p.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = {bool: isinstance(value, bool), int: number and isinstance(value, int),
            float: number, str: isinstance(value, str)}[p.kind]
    if not fits:
        raise AlignpipeError(f"{source}: config key {p.name}: expected {_EXPECTED[p.kind]}"
                             f"{' or null' if p.optional else ''}, got {value!r}")
    return float(value) if p.kind is float else value


def _merge(merged: DictConfig, values: dict, source: str) -> DictConfig:
    """`values` over `merged`; OmegaConf checks every key and type again."""
    try:
        return OmegaConf.merge(merged, values)
    except OmegaConfBaseException as err:  # e.g. a string OmegaConf reads as an interpolation
        message = str(getattr(err, "msg", err)).splitlines()[0]
        raise AlignpipeError(f"{source}: config key {getattr(err, 'full_key', '?')}: "
                             f"{message}") from None
