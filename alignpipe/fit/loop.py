"""The one training loop: latents resident on the device, batches by on-device permutation.

It uses a method only through the `TrainedMethod` protocol (methods/base.py): a method with
another loss, heads or batch transform needs no change here. It draws nothing: it emits its
events (fit start, each validated epoch, fit end) to the callbacks of fit/callbacks.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from alignpipe.data.pairing import first_rows
from alignpipe.evaluate.metrics import encoded_retrieval, nonfinite_rows
from alignpipe.fit.callbacks import Callbacks
from alignpipe.fit.runfolder import (
    CHECKPOINT,
    DIVERGED,
    HEADS_BEST,
    HEADS_LAST,
    METRICS,
    RETUNABLE,
    RunLog,
    _atomic_write,
    load_into,
    read_metrics,
    read_tensor_metadata,
    read_tensors,
    save_tensors,
)
from alignpipe.methods.base import Pairs, TrainedMethod
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.progress import progress_bar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from alignpipe.fit.callbacks import FitCallback
    from alignpipe.methods.base import Method

    Checkpoint = tuple[dict[str, torch.Tensor], dict]
    Bar = tuple[Progress, TaskID] | None

CPU_MEMORY_BUDGET = 4 << 30   # bytes of activations a CPU step may use before we shrink it
CHECKPOINT_FORMAT = "alignpipe-checkpoint-1"
# What a resume must reuse exactly: the batch decides the steps, the steps the lr schedule.
PLAN_KEYS = ("batch", "rows_per_step", "steps_per_epoch", "total_steps", "warmup", "seed",
             "train_pairs")


class DivergedError(AlignpipeError):
    """The training loss went NaN or inf: the run stops, its last good checkpoint stays."""


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


def step_bytes(method: TrainedMethod, batch: int) -> int:
    """Rough activation memory of one step, as the method estimates it."""
    return method.step_bytes(batch)


def plan_batch(method: TrainedMethod, requested: int, n_rows: int,
               device: torch.device) -> tuple[int, list[str]]:
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


def _optimizer_tensors(method: TrainedMethod,
                       optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in method.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"optim.{names[id(param)]}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(method: TrainedMethod, optimizer: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor]) -> None:
    named = list(method.named_parameters())
    device = named[0][1].device
    for name, param in named:
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                 if k.startswith(f"optim.{name}.") and "." not in k[len(f"optim.{name}."):]}
        if state:
            optimizer.state[param] = {k: v if k == "step" else v.to(device)
                                      for k, v in state.items()}


class Trainer:
    """The one training loop. fit() hands an instance to a trained method as its `loop`."""

    def __init__(self, out: Path, config: dict, device: torch.device, log: RunLog,
                 progress: bool, names: tuple[str, str], resume: bool,
                 callbacks: Callbacks | Iterable[FitCallback] = ()) -> None:
        self.out, self.cfg, self.device, self.log = out, config, device, log
        self.progress, self.names, self.resume = progress, names, resume
        self.callbacks = callbacks if isinstance(callbacks, Callbacks) else Callbacks(callbacks)
        self.history: list[dict] = []
        self.batch = self.steps_per_epoch = self.total_steps = 0
        self.train_seconds = 0.0
        self.pairs_seen = 0

    # ---- setup --------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        precision = self.cfg["precision"]
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")

    def _schedule(self, method: TrainedMethod, batch: int, n_rows: int) -> dict:
        rows_per_step = batch * method.rows_per_pair
        steps = n_rows // rows_per_step
        total = steps * self.cfg["epochs"]
        return {"batch": batch, "rows_per_step": rows_per_step, "steps_per_epoch": steps,
                "total_steps": total, "warmup": min(self.cfg["warmup_steps"], total // 2),
                "seed": self.cfg["seed"], "train_pairs": n_rows}

    def _use(self, plan: dict) -> None:
        self.plan = plan
        self.batch, self.rows_per_step = plan["batch"], plan["rows_per_step"]
        self.steps_per_epoch, self.total_steps = plan["steps_per_epoch"], plan["total_steps"]
        self.warmup = plan["warmup"]

    def _plan(self, method: TrainedMethod, n_rows: int, saved: dict | None) -> None:
        if saved is not None:
            self._reuse_plan(method, n_rows, saved)
            return
        batch, reasons = plan_batch(method, self.cfg["batch_size"], n_rows, self.device)
        self._use(self._schedule(method, batch, n_rows))
        line = (f"batch: {self.batch} pairs per step ({self.rows_per_step} rows), "
                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} in all")
        if reasons:
            line += f"; reduced from {self.cfg['batch_size']} because " + " and ".join(reasons)
        self.log(line)
        if self.warmup < self.cfg["warmup_steps"]:
            self.log(f"warmup: {self.warmup} steps (half the run) instead of "
                     f"{self.cfg['warmup_steps']}")

    def _reuse_plan(self, method: TrainedMethod, n_rows: int, saved: dict) -> None:
        """A resume takes the checkpoint's batch and schedule as they were, or refuses."""
        path = self.out / CHECKPOINT
        batch = saved.get("batch")
        if not isinstance(batch, int) or batch < 2 or set(saved) < set(PLAN_KEYS):
            raise AlignpipeError(f"{path}: damaged checkpoint (its batch plan is unreadable); "
                                 f"start again with --overwrite")
        now = self._schedule(method, batch, n_rows)
        differs = [f"{k}: {saved[k]} in the checkpoint, {now[k]} now" for k in PLAN_KEYS
                   if saved[k] != now[k]]
        if differs:
            raise AlignpipeError(
                f"{self.out}: cannot resume: the run would not continue the schedule it started "
                f"({'; '.join(differs)}); resume with the same data and config, or start again "
                f"with --overwrite")
        self._use(now)
        line = (f"batch: {self.batch} pairs per step ({self.rows_per_step} rows), "
                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} in all, "
                f"as recorded in the checkpoint")
        if step_bytes(method, batch) > _free_memory(self.device):
            line += (f"; note: a step of this batch may not fit in the {self.device.type} "
                     f"memory free now (it is kept so the run continues unchanged)")
        self.log(line)

    def _read_checkpoint(self) -> Checkpoint | None:
        """The checkpoint's tensors and metadata on a resume; None on a fresh run."""
        path = self.out / CHECKPOINT
        if not (self.resume and path.exists()):
            return None
        tensors = read_tensors(path, "checkpoint")
        raw = read_tensor_metadata(path)
        try:
            meta = {"epoch": int(raw["epoch"]), "best_value": float(raw["best_value"]),
                    "best_epoch": int(raw["best_epoch"]),
                    "plan": json.loads(raw["plan"]) if "plan" in raw else None}
        except (KeyError, ValueError) as err:
            raise AlignpipeError(f"{path}: damaged checkpoint (metadata {err}); start again "
                                 f"with --overwrite") from None
        if not 0 <= meta["epoch"] <= self.cfg["epochs"]:
            raise AlignpipeError(f"{path}: damaged checkpoint (epoch {meta['epoch']} of "
                                 f"{self.cfg['epochs']}); start again with --overwrite")
        if meta["plan"] is not None and not isinstance(meta["plan"], dict):
            raise AlignpipeError(f"{path}: damaged checkpoint (plan); start again with "
                                 f"--overwrite")
        return tensors, meta

    def _restore(self, method: TrainedMethod, optimizer: torch.optim.Optimizer,
                 checkpoint: Checkpoint | None) -> tuple[int, float, int]:
        """Epochs already done, best val value and its epoch (nothing done on a fresh run)."""
        done, best, best_epoch = 0, -math.inf, 0
        if checkpoint is not None:
            tensors, meta = checkpoint
            path = self.out / CHECKPOINT
            load_into(method, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                      path, "checkpoint")
            method.to(self.device)
            try:
                _load_optimizer(method, optimizer, tensors)
            except (RuntimeError, ValueError, IndexError) as err:
                raise AlignpipeError(f"{path}: damaged checkpoint (optimizer state: "
                                     f"{' '.join(str(err).split())[:160]})") from None
            done, best, best_epoch = meta["epoch"], meta["best_value"], meta["best_epoch"]
            self.log(f"resuming after epoch {done} of {self.cfg['epochs']}")
        # A kill between an epoch's metrics line and its checkpoint leaves a line to drop, and
        # a kill in the middle of writing one leaves a torn line (read_metrics drops it).
        self.history = [m for m in read_metrics(self.out) if m["epoch"] <= done]
        _atomic_write(self.out / METRICS, "".join(json.dumps(m) + "\n" for m in self.history))
        return done, best, best_epoch

    # ---- the loop -----------------------------------------------------------------------------
    def __call__(self, method: TrainedMethod, train: Pairs, val: Pairs) -> None:
        checkpoint = self._read_checkpoint()
        saved_plan = checkpoint[1]["plan"] if checkpoint else None
        if checkpoint and saved_plan is None:
            self.log("the checkpoint records no batch plan (an older alignpipe): planning again")
        self._plan(method, len(train), saved_plan)
        autocast = self._autocast()
        self.log(f"precision: {self.precision}; latents on {self.device} as "
                 f"{str(train.a.dtype).replace('torch.', '')}")
        optimizer = torch.optim.AdamW(method.parameter_groups(self.cfg["weight_decay"]),
                                      lr=self.cfg["lr"], betas=(0.9, 0.999))
        start, self.best_value, self.best_epoch = self._restore(method, optimizer, checkpoint)
        self.checkpoint_epoch = start
        self._emit("on_fit_start")
        with _progress_bar(self.progress, self.total_steps, start * self.steps_per_epoch,
                           self.log.console) as bar:
            losses = []
            for epoch in range(start, self.cfg["epochs"]):
                losses.append(self._train_epoch(method, optimizer, train, epoch, autocast, bar))
                self._check_finite(losses[-1], epoch + 1)
                done = epoch + 1
                if done % self.cfg["val_every"] == 0 or done == self.cfg["epochs"]:
                    self._end_epoch(method, optimizer, val, done, float(np.mean(losses)))
                    losses = []
                    _after_epoch(done)
        self._emit("on_fit_end")

    def _emit(self, event: str) -> None:
        self.callbacks.emit(event, self.out, self.history, self.names)

    def _train_epoch(self, method: TrainedMethod, optimizer: torch.optim.Optimizer,
                     train: Pairs, epoch: int, autocast: torch.autocast, bar: Bar) -> float:
        seed = _epoch_seed(self.cfg["seed"], epoch)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator(device=self.device).manual_seed(seed)
        perm = torch.randperm(len(train), generator=gen, device=self.device)
        rng = np.random.default_rng(seed)  # FuseMix's λ, drawn on the host as in its code
        method.train()
        total = torch.zeros((), device=self.device)
        self.step_losses = torch.zeros(self.steps_per_epoch, device=self.device)
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
                torch.nn.utils.clip_grad_norm_([p for _, p in method.named_parameters()],
                                               self.cfg["grad_clip"])
            optimizer.step()
            method.after_step()
            total += loss.detach()
            self.step_losses[step] = loss.detach()  # no host sync: checked after the epoch
            if bar is not None:
                self._show(bar, step, loss, started, epoch)
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.pairs_seen += self.steps_per_epoch * self.rows_per_step
        self.last_rate = self.steps_per_epoch * self.rows_per_step / max(seconds, 1e-9)
        self.last_lr = lr
        return float(total) / self.steps_per_epoch

    def _check_finite(self, loss: float, epoch: int) -> None:
        """Stop a diverged run before anything of this epoch is saved."""
        if math.isfinite(loss):
            return
        bad = (~torch.isfinite(self.step_losses)).nonzero()
        step = int(bad[0]) + 1 if bad.numel() else 0
        kept = self.checkpoint_epoch
        if kept:
            keep = (f"the checkpoint of epoch {kept} is kept: `--resume` continues from it and "
                    f"may change {', '.join(RETUNABLE)} (e.g. --resume --lr "
                    f"{self.cfg['lr'] / 2:g} --set grad_clip=1)")
            _atomic_write(self.out / DIVERGED, json.dumps(
                {"epoch": epoch, "step": step, "loss": str(loss), "checkpoint_epoch": kept}))
        else:
            keep = ("no good checkpoint was saved yet, so nothing is kept; start again with a "
                    "lower lr, --set grad_clip=1 or --set precision=fp32")
        message = (f"training loss became {loss} at epoch {epoch} (step {step} of "
                   f"{self.steps_per_epoch}): the run diverged and was stopped; {keep}")
        self.log(message)
        raise DivergedError(message)

    def _show(self, bar: Bar, step: int, loss: torch.Tensor, started: float,
              epoch: int) -> None:
        progress, task = bar
        fields = {}
        if step % self.cfg["log_every"] == 0 or step == self.steps_per_epoch - 1:
            rate = (step + 1) * self.rows_per_step / max(time.perf_counter() - started, 1e-9)
            fields = {"loss": f"{float(loss.detach()):.4f}", "rate": f"{rate:,.0f}"}
        progress.update(task, advance=1, description=f"epoch {epoch + 1}/{self.cfg['epochs']}",
                        **fields)

    def _end_epoch(self, method: TrainedMethod, optimizer: torch.optim.Optimizer, val: Pairs,
                   epoch: int, loss: float) -> None:
        val_metrics = validate(method, val, self.names)
        record = {"epoch": epoch, "step": epoch * self.steps_per_epoch, "train_loss": loss,
                  "lr": self.last_lr, **method.log_values(),
                  "pairs_per_s": self.last_rate, "val": val_metrics}
        value = val_metrics.get("mean_recall", -loss)  # no val rows: lowest loss is best
        # Non-finite encodings never make an epoch the best, whatever their recall reads.
        improved = not val_metrics.get("nonfinite") and value > self.best_value
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
        # Heads that encode to NaN/inf are not a good checkpoint: a resume from them (after a
        # divergence, with a lower lr) would diverge at once. The last finite one stays.
        if not val_metrics.get("nonfinite"):
            tensors = {**{f"model.{k}": v for k, v in heads.items()},
                       **_optimizer_tensors(method, optimizer)}
            save_tensors(self.out / CHECKPOINT, tensors,
                         {"epoch": epoch, "best_value": self.best_value,
                          "best_epoch": self.best_epoch, "format": CHECKPOINT_FORMAT,
                          "plan": json.dumps(self.plan)})
            self.checkpoint_epoch = epoch
        self.log(f"epoch {epoch}: loss {loss:.4f}, val mean recall "
                 f"{val_metrics.get('mean_recall', float('nan')):.2f}"
                 + (" (best)" if improved else "")
                 + (f"; non-finite encodings of {val_metrics['nonfinite_rows']} val rows: "
                    f"never chosen as best, checkpoint of epoch {self.checkpoint_epoch} kept"
                    if val_metrics.get("nonfinite") else ""))
        self._emit("on_epoch_end")


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


class _Bar:
    def __init__(self, total: int, completed: int, console: Console | None) -> None:
        self.progress = progress_bar("loss {task.fields[loss]}", "{task.fields[rate]} pairs/s",
                                     console=console)
        self.task = self.progress.add_task("training", total=total, completed=completed,
                                           loss="–", rate="–")

    def __enter__(self) -> tuple[Progress, TaskID]:
        self.progress.__enter__()
        return self.progress, self.task

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def _progress_bar(show: bool, total: int, completed: int,
                  console: Console | None) -> _Bar | _NoBar:
    return _Bar(total, completed, console) if show else _NoBar()


# ---- validation ---------------------------------------------------------------------------------
def direction_names(names: tuple[str, str]) -> tuple[str, str]:
    """The two retrieval directions' names, e.g. ``image_to_text``, ``text_to_image``."""
    return f"{names[0]}_to_{names[1]}", f"{names[1]}_to_{names[0]}"


def validate(method: Method, val: Pairs, names: tuple[str, str]) -> dict:
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
    # A diverged model's NaN encodings must never read as a result: flag them here, whatever
    # the recall above says (the metrics count a NaN score as a miss, but do not rely on it).
    bad = {names[0]: nonfinite_rows(enc_a), names[1]: nonfinite_rows(enc_b)}
    if any(bad.values()):
        out["nonfinite"] = True
        out["nonfinite_rows"] = bad
    return out

