"""The run folder: what a fit leaves behind, how to tell runs apart, how to load one back."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from alignpipe.errors import AlignpipeError
from alignpipe.fit.config import MAX_DIM, resolve_config
from alignpipe.fsutil import (
    atomic_path,
    atomic_write_bytes,
    exclusive_lock,
    remove_temp_files,
)
from alignpipe.latents import as_store, encoder_identity, resolve_device, storage_dtype
from alignpipe.methods import create_method
from alignpipe.yamlsafe import YamlInputError, load_yaml

CONFIG, LOG, METRICS, SUMMARY = "config.yaml", "log.txt", "metrics.jsonl", "run.json"
HEADS_BEST, HEADS_LAST = "heads-best.safetensors", "heads-last.safetensors"
CHECKPOINT, ANCHORS, CURVES = "checkpoint.safetensors", "anchors.safetensors", "curves.png"
DIVERGED = "diverged.json"  # written when the loss went non-finite; a resume may then retune
RUN_FILES = (CONFIG, LOG, METRICS, SUMMARY, HEADS_BEST, HEADS_LAST, CHECKPOINT, ANCHORS, CURVES,
             DIVERGED)
# Keys a resume of a diverged run may change: they steer the optimiser, not what a step is.
RETUNABLE = ("lr", "min_lr", "warmup_start_lr", "grad_clip", "weight_decay", "precision")
# What `alignpipe eval` writes into a run folder by default (JSON, and .md/.png beside it).
EVAL_PREFIX = "eval-"


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
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out

    @classmethod
    def read(cls, out: Path) -> FitSummary:
        """The summary a finished run left in run.json (one line naming it when damaged)."""
        path = Path(out) / SUMMARY
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            raise AlignpipeError(f"{path}: damaged run summary; refit with --overwrite") from None

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
    """The run's method, stores and config from its config.yaml (None when there is none).

    A damaged or edited file (not YAML, a Python tag, not a mapping, missing or out-of-range
    values) is an `AlignpipeError` naming it: its contents decide what code runs next.
    """
    path = Path(out) / CONFIG
    if not path.exists():
        return None
    try:
        data = load_yaml(path)
    except YamlInputError as err:
        raise AlignpipeError(f"{path}: damaged run config: "
                             f"{str(err).removeprefix(f'{path}: ')}") from None
    if not isinstance(data, dict):
        raise AlignpipeError(f"{path}: damaged run config: a mapping of method, stores and "
                             f"config was expected, found a {type(data).__name__}")
    identity = {k: data.get(k) for k in ("method", "stores", "config")}
    _check_identity(identity, path)
    return identity


def _check_identity(identity: dict, path: Path) -> None:
    """Refuse a config.yaml whose values are of the wrong kind or out of range."""
    from alignpipe.methods import is_registered

    def bad(what: str):
        return AlignpipeError(f"{path}: damaged run config: {what}")

    method, stores, config = identity["method"], identity["stores"], identity["config"]
    if not isinstance(method, str) or not is_registered(method):
        raise bad(f"method {method!r} is not a registered method")
    if not isinstance(stores, dict) or set(stores) != {"a", "b"}:
        raise bad("stores must map a and b to the two stores")
    for side, store in stores.items():
        if not isinstance(store, dict) or not isinstance(store.get("path"), str):
            raise bad(f"stores.{side} must hold the store's path")
        dim = store.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
            raise bad(f"stores.{side}.dim must be an integer in [1, {MAX_DIM}], got {dim!r}")
        if not isinstance(store.get("modality"), str):
            raise bad(f"stores.{side}.modality must be a string")
        if not isinstance(store.get("encoder", {}), dict):
            raise bad(f"stores.{side}.encoder must be a mapping")
    if not isinstance(config, dict):
        raise bad("config must be a mapping of key: value")
    try:  # the same types and ranges `fit` enforces, so a hostile value never builds a model
        resolve_config(method, config)
    except AlignpipeError as err:
        raise bad(str(err)) from None


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


@contextmanager
def run_lock(out: Path):
    """One writer per run folder: a second `fit` into it (say a `fit --resume` started while the
    first still runs) is refused instead of appending a second copy of the metrics."""
    out = Path(out).absolute()
    with exclusive_lock(out.with_name(f".{out.name}.lock"), f"run folder {out}"):
        yield


def clear_run_folder(out: Path) -> list[str]:
    """Remove everything alignpipe wrote into a run folder: the run's files, eval results
    written there (``eval-*``), and temp files of killed writers. Returns what was removed;
    other files (a user's notes) stay."""
    removed = []
    if not out.is_dir():
        return removed
    for path in sorted(out.iterdir()):
        if path.is_file() and (path.name in RUN_FILES or path.name.startswith(EVAL_PREFIX)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    remove_temp_files(out)
    return removed


def _prepare_folder(out: Path, identity: dict, resume: bool, overwrite: bool) -> str:
    """Decide new / resume / done for `out`, refusing to mix two different runs in one folder."""
    if overwrite:  # read nothing first: a damaged config.yaml must not block replacing it
        clear_run_folder(out)
        return "new"
    old = read_identity(out)
    if old is None:
        if out.exists() and any(out.iterdir()):
            raise AlignpipeError(f"{out}: folder exists and is not a run; choose another --out")
        return "new"
    finished = (out / SUMMARY).exists()
    if old != identity and resume and not finished and _retune(out, old, identity):
        return "resume"
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


def _retune(out: Path, old: dict, identity: dict) -> bool:
    """Let the resume of a diverged run change its optimiser settings (a lower lr, clipping,
    fp32); config.yaml then holds the new values and lists the change under ``retuned``."""
    if not (out / DIVERGED).exists() or old["method"] != identity["method"] \
            or old["stores"] != identity["stores"]:
        return False
    before, after = old["config"], identity["config"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not changed or not set(changed) <= set(RETUNABLE):
        return False
    try:
        stop = json.loads((out / DIVERGED).read_text())
    except (OSError, ValueError):
        stop = {}
    data = load_yaml(out / CONFIG)
    data["config"] = after
    data.setdefault("retuned", []).append(
        {"after_epoch": stop.get("checkpoint_epoch"),
         "changes": {k: [before.get(k), after.get(k)] for k in changed}})
    _atomic_write(out / CONFIG, yaml.safe_dump(data, sort_keys=False))
    return True


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
    """The metrics lines of a run. A torn last line (a kill or a full disk mid-write) is left
    out; any other line that is not a JSON record is an error naming the file and line."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(
        path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not a metrics record")
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a kill mid-append: the checkpoint never saw this epoch
            raise AlignpipeError(f"{path}: line {number} is not a metrics record (edited or "
                                 f"damaged); fix or remove the line") from None
        records.append(record)
    return records


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file of the run, or one line naming it when it is missing or damaged."""
    if not path.exists():
        raise AlignpipeError(f"{path}: missing (the run's {what}); refit with --overwrite")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AlignpipeError(f"{path}: damaged {what}, not a readable safetensors file "
                             f"({' '.join(str(err).split())[:160]}); refit with "
                             f"--overwrite") from None


def read_tensor_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AlignpipeError(f"{path}: damaged, not a readable safetensors file "
                             f"({' '.join(str(err).split())[:160]})") from None


def load_into(method, tensors: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load saved tensors into a method, naming the file when they do not fit its heads."""
    try:
        method.load_state_tensors(tensors)
    except (RuntimeError, KeyError, ValueError) as err:
        raise AlignpipeError(f"{path}: damaged {what}: it does not fit the heads of the run's "
                             f"config.yaml ({' '.join(str(err).split())[:200]})") from None


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
    method = create_method(identity["method"], resolve_config(identity["method"],
                                                              identity["config"]),
                           stores["a"]["dim"], stores["b"]["dim"])
    if method.trained:
        heads = path / (HEADS_BEST if which == "best" else HEADS_LAST)
        load_into(method, read_tensors(heads, "heads"), heads, "heads")
    else:
        _load_anchors(method, path, stores, dev, identity["config"])
    return LoadedRun(path, method.to(dev), identity)


def _load_anchors(method, path: Path, stores: dict, device: torch.device, cfg: dict) -> None:
    from alignpipe.latents import check_encoder, read_rows, to_device

    load_into(method, read_tensors(path / ANCHORS, "anchor list"), path / ANCHORS,
              "anchor list")
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
