"""Stage two: train alignment heads on two stores of one manifest, with the loop written once.

``fit(store_a, store_b, method="fusemix", out="runs/x")`` loads the valid training rows of both
stores onto the device once, draws every batch by an on-device permutation (no per-sample
DataLoader), validates on the manifest's val split each epoch, keeps the best heads by val
recall, and can resume a killed run exactly. The run folder::

    config.yaml              method, stores (path, modality, encoder, manifest sha), config
    log.txt                  what happened, including batch-size reductions and dropped rows
    metrics.jsonl            one line per epoch: loss, lr, temperature, val recall, pairs/s
    heads-best.safetensors   heads of the best val epoch (what eval loads)
    heads-last.safetensors   heads after the last epoch
    checkpoint.safetensors   last heads + AdamW state + epoch, for --resume
    anchors.safetensors      asif only: the anchor rows (the latents stay in the stores)
    curves.png               loss and val recall per epoch
    run.json                 the summary; written last, so its presence means "finished"
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from alignpipe import __version__
from alignpipe.errors import AlignpipeError
from alignpipe.latents import (
    as_store,
    encoder_identity,
    load_pairs,
    open_pair,
    resolve_device,
    storage_dtype,
    train_val_rows,
)
from alignpipe.methods import create_method, method_spec
from alignpipe.methods.base import Pairs
from alignpipe.metrics import encoded_retrieval

CONFIG, LOG, METRICS, SUMMARY = "config.yaml", "log.txt", "metrics.jsonl", "run.json"
HEADS_BEST, HEADS_LAST = "heads-best.safetensors", "heads-last.safetensors"
CHECKPOINT, ANCHORS, CURVES = "checkpoint.safetensors", "anchors.safetensors", "curves.png"

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
CPU_MEMORY_BUDGET = 4 << 30   # bytes of activations a CPU step may use before we shrink it
PLOT_EVERY_S = 30.0


@dataclass
class FitSummary:
    run_dir: Path
    method: str
    epochs: int
    best_epoch: int
    best_val: dict
    pairs_per_s: float
    wall_s: float
    train_pairs: int = 0
    val_pairs: int = 0
    dropped_rows: dict = field(default_factory=dict)
    batch_size: int = 0
    steps: int = 0
    device: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FitSummary:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{**known, "run_dir": Path(known["run_dir"])})


# ---- config -------------------------------------------------------------------------------------
def default_config(method: str) -> dict:
    spec = method_spec(method)
    return {**COMMON_DEFAULTS, **(TRAIN_DEFAULTS if spec.trained else {}), **spec.defaults}


def _coerce(key: str, value, default):
    """Parse a --set string and check it has the type of the default."""
    if isinstance(value, str) and not isinstance(default, str):
        text = value
        value = yaml.safe_load(value) if value != "" else None
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
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise AlignpipeError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise AlignpipeError(f"{path}: a fit config is a mapping of key: value")
    named = data.pop("method", method)
    if named != method:
        raise AlignpipeError(f"fit config is for method {named!r} but --method is {method!r}")
    return data


def resolve_config(method: str, config: str | Path | dict | None = None,
                   overrides: dict | None = None) -> dict:
    """Defaults ← config file ← overrides (``--set`` and the common flags), type-checked."""
    resolved = default_config(method)
    for source, values in (("config file", _config_file(config, method)),
                           ("--set", overrides or {})):
        for key, value in values.items():
            if key not in resolved:
                raise AlignpipeError(
                    f"{source}: unknown key {key!r} for method {method}; known keys: "
                    f"{', '.join(sorted(resolved))}")
            resolved[key] = _coerce(key, value, default_config(method)[key])
    _check_ranges(resolved)
    return resolved


def _check_ranges(cfg: dict) -> None:
    problems = []
    if "epochs" in cfg and cfg["epochs"] < 1:
        problems.append(f"epochs must be ≥ 1 (got {cfg['epochs']})")
    if "batch_size" in cfg and cfg["batch_size"] < 2:
        problems.append(f"batch_size must be ≥ 2 for a contrastive loss (got {cfg['batch_size']})")
    if "val_every" in cfg and cfg["val_every"] < 1:
        problems.append(f"val_every must be ≥ 1 (got {cfg['val_every']})")
    if "lr" in cfg and cfg["lr"] <= 0:
        problems.append(f"lr must be > 0 (got {cfg['lr']})")
    if cfg.get("precision", "auto") not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
    if cfg.get("storage_dtype", "auto") not in STORAGE_DTYPES:
        problems.append(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}")
    if not 0 <= cfg["val_fraction"] < 1:
        problems.append(f"val_fraction must be in [0, 1) (got {cfg['val_fraction']})")
    if problems:
        raise AlignpipeError("fit config: " + "; ".join(problems))


# ---- run folder ---------------------------------------------------------------------------------
def store_identity(store) -> dict:
    return {"path": str(Path(store.path).resolve()), "modality": store.modality,
            "dim": store.dim, "encoder": encoder_identity(store),
            "manifest_sha256": store.manifest_info.get("sha256")}


def run_identity(method: str, config: dict, a, b) -> dict:
    """Everything that decides a run's result: same identity, same run."""
    return {"method": method, "stores": {"a": store_identity(a), "b": store_identity(b)},
            "config": config}


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """safetensors, atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


def read_identity(out: Path) -> dict | None:
    path = Path(out) / CONFIG
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    return {k: data.get(k) for k in ("method", "stores", "config")}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


def run_state(out, store_a, store_b, *, method: str, config=None, overrides=None) -> str:
    """``missing``, ``complete``, ``incomplete`` (same run, killed) or ``different``."""
    old = read_identity(Path(out))
    if old is None:
        return "missing"
    a, b = as_store(store_a), as_store(store_b)
    if old != run_identity(method, resolve_config(method, config, overrides), a, b):
        return "different"
    return "complete" if (Path(out) / SUMMARY).exists() else "incomplete"


def run_is_complete(out, store_a, store_b, *, method: str, config=None, overrides=None) -> bool:
    """True when `out` holds a finished run with this exact resolved config and these stores."""
    return run_state(out, store_a, store_b, method=method, config=config,
                     overrides=overrides) == "complete"


def _prepare_folder(out: Path, identity: dict, resume: bool, overwrite: bool) -> str:
    """Decide new / resume / done for `out`, refusing to mix two different runs in one folder."""
    old = read_identity(out)
    if old is None:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise AlignpipeError(f"{out}: folder exists and is not a run; choose another --out")
        return "new"
    if overwrite:
        for name in (CONFIG, LOG, METRICS, SUMMARY, HEADS_BEST, HEADS_LAST, CHECKPOINT, ANCHORS,
                     CURVES):
            (out / name).unlink(missing_ok=True)
        return "new"
    finished = (out / SUMMARY).exists()
    if old != identity:
        changes = "; ".join(_differences(old, identity)[:8])
        raise AlignpipeError(f"{out}: holds a different run ({changes}); choose another --out "
                             f"or pass --overwrite to replace it")
    if finished:
        return "done"
    if not resume:
        raise AlignpipeError(f"{out}: holds an unfinished run of this config; pass --resume to "
                             f"continue it or --overwrite to start again")
    return "resume"


class RunLog:
    """Lines to ``log.txt`` and, when showing progress, to the terminal."""

    def __init__(self, path: Path, echo: bool):
        self.path = path
        self.echo = echo
        self._console = None

    @property
    def console(self):
        """The terminal console; the progress bar shares it so log lines print above it."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def __call__(self, line: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(self.path, "a") as handle:
            handle.write(f"{stamp} {line}\n")
        if self.echo:
            self.console.print(line, markup=False, highlight=False)


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the loop -----------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, cfg: dict) -> float:
    """Linear warmup from warmup_start_lr, then cosine to min_lr, per step."""
    if step < warmup:
        return cfg["warmup_start_lr"] + (cfg["lr"] - cfg["warmup_start_lr"]) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg["min_lr"] + (cfg["lr"] - cfg["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return min(int(avail) // 2, CPU_MEMORY_BUDGET)


def step_bytes(method, batch: int) -> int:
    """Rough activation memory of one step: saved Linear inputs/outputs plus the logits."""
    from torch import nn

    multiples = method.transform.batch_multiples if method.transform else (1,)
    per_row = sum(m.in_features + 2 * m.out_features
                  for side in ("a", "b") for m in method.model[side].modules()
                  if isinstance(m, nn.Linear))
    rows = batch * sum(multiples) + batch * method.rows_per_pair
    return 4 * (rows * per_row + sum(6 * (m * batch) ** 2 for m in multiples))


def plan_batch(method, requested: int, n_rows: int, device: torch.device) -> tuple[int, list[str]]:
    """The batch actually used, and why it differs from the requested one."""
    batch, reasons = requested, []
    per_pair = method.rows_per_pair
    if batch * per_pair > n_rows:
        batch = n_rows // per_pair
        reasons.append(f"the training set has {n_rows} valid rows"
                       + (f" and {method.name} draws {per_pair} rows per pair" if per_pair > 1
                          else ""))
    budget = _free_memory(device)
    shrunk = False
    while batch > 2 and step_bytes(method, batch) > budget:
        batch //= 2
        shrunk = True
    if shrunk:
        reasons.append(f"a step must fit in {budget / 2**30:.1f} GiB of {device.type} memory")
    if batch < 2:
        raise AlignpipeError(
            f"only {n_rows} valid training rows: a contrastive step needs at least "
            f"{2 * per_pair} ({method.name} draws {per_pair} rows per pair)")
    return batch, reasons


def _epoch_seed(seed: int, epoch: int) -> int:
    # One seed per epoch makes a resumed run draw exactly what an uninterrupted one would.
    return (seed * 1_000_003 + epoch) % (2**63)


def _after_epoch(epoch: int) -> None:
    """Hook called after each epoch's checkpoint; tests replace it to simulate a kill."""


def _optimizer_tensors(method, optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in method.model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"optim.{names[id(param)]}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(method, optimizer, tensors: dict[str, torch.Tensor]) -> None:
    device = next(method.model.parameters()).device
    for name, param in method.model.named_parameters():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                 if k.startswith(f"optim.{name}.") and "." not in k[len(f"optim.{name}."):]}
        if state:
            optimizer.state[param] = {k: v if k == "step" else v.to(device)
                                      for k, v in state.items()}


class Trainer:
    """The one training loop. fit() hands an instance to a trained method as its `loop`."""

    def __init__(self, out: Path, config: dict, device: torch.device, log: RunLog,
                 progress: bool, names: tuple[str, str], resume: bool):
        self.out, self.cfg, self.device, self.log = out, config, device, log
        self.progress, self.names, self.resume = progress, names, resume
        self.history: list[dict] = []
        self.batch = self.steps_per_epoch = self.total_steps = 0
        self.train_seconds = 0.0
        self.pairs_seen = 0
        self.last_plot = time.perf_counter()

    # ---- setup --------------------------------------------------------------------------------
    def _autocast(self):
        precision = self.cfg["precision"]
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")

    def _plan(self, method, n_rows: int) -> None:
        self.batch, reasons = plan_batch(method, self.cfg["batch_size"], n_rows, self.device)
        self.rows_per_step = self.batch * method.rows_per_pair
        self.steps_per_epoch = n_rows // self.rows_per_step
        self.total_steps = self.steps_per_epoch * self.cfg["epochs"]
        self.warmup = min(self.cfg["warmup_steps"], self.total_steps // 2)
        line = (f"batch: {self.batch} pairs per step ({self.rows_per_step} rows), "
                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} in all")
        if reasons:
            line += f"; reduced from {self.cfg['batch_size']} because " + " and ".join(reasons)
        self.log(line)
        if self.warmup < self.cfg["warmup_steps"]:
            self.log(f"warmup: {self.warmup} steps (half the run) instead of "
                     f"{self.cfg['warmup_steps']}")

    def _restore(self, method, optimizer) -> tuple[int, float, int]:
        """Epochs already done, best val value and its epoch (nothing done on a fresh run)."""
        path = self.out / CHECKPOINT
        done, best, best_epoch = 0, -math.inf, 0
        if self.resume and path.exists():
            tensors = load_file(str(path), device="cpu")
            with open(path, "rb") as handle:  # the header holds the metadata
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            meta = header.get("__metadata__", {})
            method.load_state_tensors({k[6:]: v for k, v in tensors.items()
                                       if k.startswith("model.")})
            method.to(self.device)
            _load_optimizer(method, optimizer, tensors)
            done, best, best_epoch = (int(meta["epoch"]), float(meta["best_value"]),
                                      int(meta["best_epoch"]))
            self.log(f"resuming after epoch {done} of {self.cfg['epochs']}")
        # A kill between an epoch's metrics line and its checkpoint leaves a line to drop.
        self.history = [m for m in read_metrics(self.out) if m["epoch"] <= done]
        _atomic_write(self.out / METRICS, "".join(json.dumps(m) + "\n" for m in self.history))
        return done, best, best_epoch

    # ---- the loop -----------------------------------------------------------------------------
    def __call__(self, method, train: Pairs, val: Pairs) -> None:
        self._plan(method, len(train))
        autocast = self._autocast()
        self.log(f"precision: {self.precision}; latents on {self.device} as "
                 f"{str(train.a.dtype).replace('torch.', '')}")
        optimizer = torch.optim.AdamW(method.parameter_groups(self.cfg["weight_decay"]),
                                      lr=self.cfg["lr"], betas=(0.9, 0.999))
        start, self.best_value, self.best_epoch = self._restore(method, optimizer)
        with _progress_bar(self.progress, self.total_steps, start * self.steps_per_epoch,
                           self.log.console) as bar:
            losses = []
            for epoch in range(start, self.cfg["epochs"]):
                losses.append(self._train_epoch(method, optimizer, train, epoch, autocast, bar))
                done = epoch + 1
                if done % self.cfg["val_every"] == 0 or done == self.cfg["epochs"]:
                    self._end_epoch(method, optimizer, val, done, float(np.mean(losses)))
                    losses = []
                    _after_epoch(done)

    def _train_epoch(self, method, optimizer, train: Pairs, epoch: int, autocast, bar) -> float:
        seed = _epoch_seed(self.cfg["seed"], epoch)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator(device=self.device).manual_seed(seed)
        perm = torch.randperm(len(train), generator=gen, device=self.device)
        rng = np.random.default_rng(seed)  # FuseMix's λ, drawn on the host as in its code
        method.model.train()
        total = torch.zeros((), device=self.device)
        started = time.perf_counter()
        for step in range(self.steps_per_epoch):
            idx = perm[step * self.rows_per_step:(step + 1) * self.rows_per_step]
            lr = lr_at(epoch * self.steps_per_epoch + step, self.total_steps, self.warmup,
                       self.cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                # index_select: advanced indexing (a[idx]) takes a far slower path on CPU
                loss = method.training_loss(train.a.index_select(0, idx),
                                            train.b.index_select(0, idx), rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(method.model.parameters(), self.cfg["grad_clip"])
            optimizer.step()
            method.after_step()
            total += loss.detach()
            if bar is not None:
                self._show(bar, step, loss, started, epoch)
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.pairs_seen += self.steps_per_epoch * self.rows_per_step
        self.last_rate = self.steps_per_epoch * self.rows_per_step / max(seconds, 1e-9)
        self.last_lr = lr
        return float(total) / self.steps_per_epoch

    def _show(self, bar, step: int, loss: torch.Tensor, started: float, epoch: int) -> None:
        progress, task = bar
        fields = {}
        if step % self.cfg["log_every"] == 0 or step == self.steps_per_epoch - 1:
            rate = (step + 1) * self.rows_per_step / max(time.perf_counter() - started, 1e-9)
            fields = {"loss": f"{float(loss):.4f}", "rate": f"{rate:,.0f}"}
        progress.update(task, advance=1, description=f"epoch {epoch + 1}/{self.cfg['epochs']}",
                        **fields)

    def _end_epoch(self, method, optimizer, val: Pairs, epoch: int, loss: float) -> None:
        val_metrics = validate(method, val, self.names)
        record = {"epoch": epoch, "step": epoch * self.steps_per_epoch, "train_loss": loss,
                  "lr": self.last_lr, "temperature": float(method.model["loss"]().detach()),
                  "pairs_per_s": self.last_rate, "val": val_metrics}
        value = val_metrics.get("mean_recall", -loss)  # no val rows: lowest loss is best
        improved = value > self.best_value
        if improved:
            self.best_value, self.best_epoch = value, epoch
        meta = {"method": method.name, "epoch": epoch}
        heads = method.state_tensors()
        save_tensors(self.out / HEADS_LAST, heads, meta)
        if improved:
            save_tensors(self.out / HEADS_BEST, heads, meta)
        # metrics before the checkpoint: a resume drops lines past the checkpoint's epoch
        self.history.append(record)
        with open(self.out / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        tensors = {**{f"model.{k}": v for k, v in heads.items()},
                   **_optimizer_tensors(method, optimizer)}
        save_tensors(self.out / CHECKPOINT, tensors,
                     {"epoch": epoch, "best_value": self.best_value,
                      "best_epoch": self.best_epoch, "format": "alignpipe-checkpoint-1"})
        self.log(f"epoch {epoch}: loss {loss:.4f}, val mean recall "
                 f"{val_metrics.get('mean_recall', float('nan')):.2f}"
                 + (" (best)" if improved else ""))
        # A plot costs ~0.1 s: redraw at the end, and during long runs at most every PLOT_EVERY_S.
        if epoch == self.cfg["epochs"] or time.perf_counter() - self.last_plot > PLOT_EVERY_S:
            _plot_curves(self.out, self.history, self.names)
            self.last_plot = time.perf_counter()


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Bar:
    def __init__(self, total: int, completed: int, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} pairs/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("training", total=total, completed=completed,
                                           loss="–", rate="–")

    def __enter__(self):
        self.progress.__enter__()
        return self.progress, self.task

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _progress_bar(show: bool, total: int, completed: int, console):
    return _Bar(total, completed, console) if show else _NoBar()


def _plot_curves(out: Path, history: list[dict], names: tuple[str, str]) -> None:
    from alignpipe.report import plot_fit_curves

    plot_fit_curves(out / CURVES, history, names)


# ---- validation ---------------------------------------------------------------------------------
def direction_names(names: tuple[str, str]) -> tuple[str, str]:
    return f"{names[0]}_to_{names[1]}", f"{names[1]}_to_{names[0]}"


def first_rows(items: np.ndarray) -> np.ndarray:
    """Index of the first row of each item, in item order (items are numbered 0..n-1)."""
    return np.unique(items, return_index=True)[1]


def validate(method, val: Pairs, names: tuple[str, str]) -> dict:
    """Recall@1/5/10 both ways on the val pairs, plus their mean (the selection criterion)."""
    if len(val) == 0:
        return {}
    enc_a = method.encode("a", val.a[torch.as_tensor(first_rows(val.items_a),
                                                     device=val.a.device)])
    enc_b = method.encode("b", val.b[torch.as_tensor(first_rows(val.items_b),
                                                     device=val.b.device)])
    forward, backward = encoded_retrieval(enc_a, enc_b, val.items_a, val.items_b)
    ab, ba = direction_names(names)
    out = {ab: forward, ba: backward}
    out["mean_recall"] = float(np.mean([*forward.values(), *backward.values()]))
    return out


# ---- entry point --------------------------------------------------------------------------------
def fit(store_a, store_b, *, method: str, out, config=None, overrides: dict | None = None,
        resume: bool = False, device=None, progress: bool = True,
        overwrite: bool = False) -> FitSummary:
    """Train (or, for asif, collect anchors for) an alignment of two stores into `out`.

    A finished run with the same config and stores is returned as it is; an unfinished one
    needs ``resume=True``; a different one in `out` needs ``overwrite=True``.
    """
    started = time.perf_counter()
    a, b, manifest = open_pair(store_a, store_b)
    cfg = resolve_config(method, config, overrides)
    identity = run_identity(method, cfg, a, b)
    out = Path(out)
    state = _prepare_folder(out, identity, resume, overwrite)
    if state == "done":
        return FitSummary.from_dict(json.loads((out / SUMMARY).read_text()))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if state == "new":
        _atomic_write(out / CONFIG, yaml.safe_dump(
            {**identity, "manifest": a.manifest_info, "alignpipe_version": __version__},
            sort_keys=False))
    try:
        return _run(a, b, manifest, method, cfg, out, state, device, progress, started)
    except AlignpipeError:
        # A run refused before its first checkpoint leaves nothing behind to "resume".
        if state == "new" and not (out / CHECKPOINT).exists():
            for name in (CONFIG, LOG, METRICS, ANCHORS):
                (out / name).unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _run(a, b, manifest, method: str, cfg: dict, out: Path, state: str, device,
         progress: bool, started: float) -> FitSummary:
    dev = resolve_device(device)
    log = RunLog(out / LOG, echo=progress)
    log(f"fit {method}: {a.modality} {a.path} (dim {a.dim}) ↔ {b.modality} {b.path} "
        f"(dim {b.dim}) on {dev}")
    torch.manual_seed(cfg["seed"])
    train, val, dropped = _load_splits(a, b, manifest, cfg, dev, log)
    model = create_method(method, cfg, a.dim, b.dim).to(dev)
    names = (a.modality, b.modality)
    if model.trained:
        trainer = Trainer(out, cfg, dev, log, progress, names, resume=state == "resume")
        model.fit(train, val, loop=trainer)
        history = read_metrics(out)
        best = next((m for m in history if m["epoch"] == trainer.best_epoch), history[-1])
        rate = trainer.pairs_seen / max(trainer.train_seconds, 1e-9)
        epochs, best_epoch, batch = cfg["epochs"], trainer.best_epoch, trainer.batch
        steps = trainer.total_steps
    else:
        model.fit(train, val)
        save_tensors(out / ANCHORS, model.state_tensors(), {"method": method})
        best = {"epoch": 0, "val": validate(model, val, names)}
        _atomic_write(out / METRICS, json.dumps(best) + "\n")
        log(f"{len(train)} anchor pairs; val mean recall "
            f"{best['val'].get('mean_recall', float('nan')):.2f}")
        rate, epochs, best_epoch, batch, steps = 0.0, 0, 0, 0, 0
    summary = FitSummary(
        run_dir=out, method=method, epochs=epochs, best_epoch=best_epoch, best_val=best["val"],
        pairs_per_s=rate, wall_s=time.perf_counter() - started, train_pairs=len(train),
        val_pairs=len(val), dropped_rows=dropped, batch_size=batch, steps=steps,
        device=str(dev))
    _atomic_write(out / SUMMARY, json.dumps({**summary.to_dict(), "complete": True,
                                             "finished": datetime.now(timezone.utc).isoformat(
                                                 timespec="seconds")}, indent=2))
    log(f"done in {summary.wall_s:.1f} s: best epoch {best_epoch}, "
        f"val mean recall {best['val'].get('mean_recall', float('nan')):.2f}")
    return summary


def _load_splits(a, b, manifest, cfg: dict, device: torch.device, log: RunLog):
    train_rows, val_rows, how = train_val_rows(manifest, cfg["val_fraction"])
    log(how)
    dtype = storage_dtype(device, cfg.get("storage_dtype", "auto"))
    train, lost_train = load_pairs(a, b, manifest, train_rows, device, dtype)
    val, lost_val = load_pairs(a, b, manifest, val_rows, device, dtype)
    dropped = {"train": train_rows.size - len(train), "val": val_rows.size - len(val),
               "invalid_in_a": lost_train[0] + lost_val[0],
               "invalid_in_b": lost_train[1] + lost_val[1]}
    if dropped["train"] or dropped["val"]:
        log(f"dropped rows invalid in either store: {dropped['train']} train, {dropped['val']} "
            f"val ({dropped['invalid_in_a']} invalid in {a.path.name}, "
            f"{dropped['invalid_in_b']} in {b.path.name})")
    if len(train) == 0:
        raise AlignpipeError(f"no training rows valid in both {a.path} and {b.path}")
    log(f"{len(train)} training pairs, {len(val)} validation pairs")
    return train, val, dropped


# ---- loading a finished run (for eval) ----------------------------------------------------------
@dataclass
class LoadedRun:
    path: Path
    method: object
    identity: dict

    def side_of(self, modality: str) -> str | None:
        for side in ("a", "b"):
            if self.identity["stores"][side]["modality"] == modality:
                return side
        return None


def load_run(run, device=None, which: str = "best") -> LoadedRun:
    """Rebuild a fitted method from its run folder (heads, or asif's anchors from the stores)."""
    path = Path(run)
    identity = read_identity(path)
    if identity is None:
        raise AlignpipeError(f"{path}: not a run folder (no {CONFIG})")
    if not (path / SUMMARY).exists():
        raise AlignpipeError(f"{path}: the run has not finished (no {SUMMARY}); continue it "
                             f"with `alignpipe fit ... --out {path} --resume`")
    dev = resolve_device(device)
    stores = identity["stores"]
    method = create_method(identity["method"], identity["config"], stores["a"]["dim"],
                           stores["b"]["dim"])
    if method.trained:
        heads = path / (HEADS_BEST if which == "best" else HEADS_LAST)
        method.load_state_tensors(load_file(str(heads), device="cpu"))
    else:
        _load_anchors(method, path, stores, dev, identity["config"])
    return LoadedRun(path, method.to(dev), identity)


def _load_anchors(method, path: Path, stores: dict, device: torch.device, cfg: dict) -> None:
    from alignpipe.latents import check_encoder, read_rows, to_device

    method.load_state_tensors(load_file(str(path / ANCHORS), device="cpu"))
    opened = {}
    for side in ("a", "b"):
        store = as_store(stores[side]["path"])
        if store.manifest_info.get("sha256") != stores[side]["manifest_sha256"]:
            raise AlignpipeError(f"{store.path}: no longer the store the asif run {path} took "
                                 f"its anchors from (manifest changed)")
        check_encoder(store, stores[side]["encoder"], side)
        opened[side] = to_device(read_rows(store, method.anchor_rows), device,
                                 storage_dtype(device, cfg.get("storage_dtype", "auto")))
    method.set_anchors(opened["a"], opened["b"], method.anchor_rows)
