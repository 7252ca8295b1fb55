"""The run folder: what a fit leaves behind, how to tell runs apart, how to load one back."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from alignpipe.errors import AlignpipeError
from alignpipe.fit.config import resolve_config
from alignpipe.fsutil import atomic_path, atomic_write_bytes
from alignpipe.latents import as_store, encoder_identity, resolve_device, storage_dtype
from alignpipe.methods import create_method

CONFIG, LOG, METRICS, SUMMARY = "config.yaml", "log.txt", "metrics.jsonl", "run.json"
HEADS_BEST, HEADS_LAST = "heads-best.safetensors", "heads-last.safetensors"
CHECKPOINT, ANCHORS, CURVES = "checkpoint.safetensors", "anchors.safetensors", "curves.png"


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


def store_identity(store) -> dict:
    return {"path": str(Path(store.path).resolve()), "modality": store.modality,
            "dim": store.dim, "encoder": encoder_identity(store),
            "manifest_sha256": store.manifest_info.get("sha256")}


def run_identity(method: str, config: dict, a, b) -> dict:
    """Everything that decides a run's result: same identity, same run."""
    return {"method": method, "stores": {"a": store_identity(a), "b": store_identity(b)},
            "config": config}


def _atomic_write(path: Path, data: bytes | str) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """safetensors, atomically: a kill leaves the old file or the new one, never half of one."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})


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
