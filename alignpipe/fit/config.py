"""Fit configs: defaults per method, a YAML file and ``key=value`` overrides, type-checked."""

from __future__ import annotations

from pathlib import Path

from alignpipe.methods import method_spec
from alignpipe.methods.losses import list_losses, loss_spec
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.yamlsafe import load_yaml

# Keys every method understands.
COMMON_DEFAULTS = {
    "seed": 0,
    "val_fraction": 0.05,     # held out by hash of id when the manifest has no val split
}
# Keys of the training loop (trained methods only). Defaults follow the FuseMix release config.
TRAIN_DEFAULTS = {
    "epochs": 20,
    "batch_size": 20480,      # loss pairs per step (FuseMix: 2× this many rows are drawn)
    "lr": 1.0e-3,
    "min_lr": 1.0e-6,
    "warmup_start_lr": 1.0e-6,
    "warmup_steps": 100,
    "weight_decay": 0.1,      # weight matrices only
    "grad_clip": 0.0,         # max grad norm; 0 = off
    "precision": "auto",      # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16
    "storage_dtype": "auto",  # latents on the device: auto (fp16 on GPU, fp32 on CPU), ...
    "log_every": 10,          # steps between progress-bar loss updates
    "val_every": 1,           # epochs between validations (= checkpoints); the last always
}
PRECISIONS = ("auto", "fp32", "bf16")
STORAGE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Bounds on sizes, so a mistyped or hostile config is refused instead of building a model that
# hangs or exhausts memory (blocks: 1000000). Far above anything the papers use.
MAX_DIM = 1 << 20         # a latent or output width
MAX_BLOCKS = 64           # residual blocks per head (FuseMix: 4)
MAX_EXPANSION = 64        # hidden width / input width (FuseMix: 4)
MAX_EPOCHS = 1_000_000
# Bounds checked for every key a method has: (low, high, low inclusive). None = no bound.
RANGES = {
    "out_dim": (1, MAX_DIM, True),
    "blocks": (0, MAX_BLOCKS, True),
    "expansion": (0, MAX_EXPANSION, False),
    "dropout": (0, 1, True),
    "alpha": (0, None, False),
    "temperature": (0, None, False),
    "temperature_min": (0, None, False),
    "temperature_max": (0, None, False),
    "topk": (1, None, True),
    "power": (0, None, False),
    "epochs": (1, MAX_EPOCHS, True),
    "warmup_steps": (0, None, True),
    "lr": (0, None, False),
    "min_lr": (0, None, True),
    "warmup_start_lr": (0, None, True),
    "weight_decay": (0, None, True),
    "grad_clip": (0, None, True),
    "log_every": (1, None, True),
}


def default_config(method: str) -> dict:
    spec = method_spec(method)
    return {**COMMON_DEFAULTS, **(TRAIN_DEFAULTS if spec.trained else {}), **spec.defaults}


def _coerce(key: str, value, default):
    """Parse a --set string and check it has the type of the default."""
    if isinstance(value, str) and not isinstance(default, str):
        text = value
        value = load_yaml(value, f"--set {key}") if value != "" else None
        if isinstance(value, str) and isinstance(default, (int, float)):
            try:  # YAML reads 1e-3 (no dot) as a string
                value = float(text)
            except ValueError:
                pass
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise AlignpipeError(f"config key {key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise AlignpipeError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AlignpipeError(f"config key {key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise AlignpipeError(f"config key {key}: expected a string, got {value!r}")
    return value


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


def resolve_config(method: str, config: str | Path | dict | None = None,
                   overrides: dict | None = None, base: dict | None = None) -> dict:
    """Defaults ← `base` (a saved run's config) ← config file ← overrides (``--set`` and the
    common flags), type- and range-checked."""
    sources = (("saved run config", dict(base or {})),
               ("config file", _config_file(config, method)),
               ("--set", overrides or {}))
    defaults = _with_loss_keys(default_config(method), sources)
    resolved = dict(defaults)
    for source, values in sources:
        for key, value in values.items():
            if key not in resolved:
                raise AlignpipeError(
                    f"{source}: unknown key {key!r} for method {method}; known keys: "
                    f"{', '.join(sorted(resolved))}")
            resolved[key] = _coerce(key, value, defaults[key])
    _check_ranges(resolved)
    return resolved


def _with_loss_keys(defaults: dict, sources) -> dict:
    """`defaults` plus the config keys of the loss the sources choose (a trained method's
    ``loss`` key; the last source that sets it wins), after checking it is registered."""
    if "loss" not in defaults:
        return defaults
    name = defaults["loss"]
    for _, values in sources:
        name = values.get("loss", name)
    if not isinstance(name, str):
        return defaults  # _coerce refuses it by name
    if name not in list_losses():
        raise AlignpipeError(f"fit config: loss must be one of {', '.join(list_losses())} "
                             f"(got {name!r})")
    extra = {k: v for k, v in loss_spec(name).defaults.items() if k not in defaults}
    return {**defaults, **extra}


def _outside(key: str, value, bounds: tuple) -> str | None:
    low, high, inclusive = bounds
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or (low is not None and (value < low or (value == low and not inclusive))) \
            or (high is not None and value > high):
        lo = f"{'[' if inclusive else '('}{low}"
        hi = f"{high}]" if high is not None else "∞)"
        return f"{key} must be in {lo}, {hi} (got {value})"
    return None


def _check_ranges(cfg: dict) -> None:
    problems = [p for key, bounds in RANGES.items() if key in cfg
                for p in [_outside(key, cfg[key], bounds)] if p]
    if "dropout" in cfg and cfg["dropout"] == 1:
        problems.append("dropout must be < 1 (got 1)")
    if "batch_size" in cfg and cfg["batch_size"] < 2:
        problems.append(f"batch_size must be ≥ 2 for a contrastive loss (got {cfg['batch_size']})")
    if "val_every" in cfg and cfg["val_every"] < 1:
        problems.append(f"val_every must be ≥ 1 (got {cfg['val_every']})")
    if cfg.get("precision", "auto") not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
    if cfg.get("storage_dtype", "auto") not in STORAGE_DTYPES:
        problems.append(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}")
    if not 0 <= cfg["val_fraction"] < 1:
        problems.append(f"val_fraction must be in [0, 1) (got {cfg['val_fraction']})")
    if problems:
        raise AlignpipeError("fit config: " + "; ".join(problems))
