"""The run folder: what a fit leaves behind, how to tell runs apart, how to load one back."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from alignpipe.data.pairing import as_store, encoder_identity, resolve_device, storage_dtype
from alignpipe.fit.config import MAX_DIM, resolve_config
from alignpipe.methods import create_method
from alignpipe.methods.losses import DEFAULT_LOSS
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import (
    atomic_path,
    atomic_write_bytes,
    exclusive_lock,
    os_errors,
    remove_temp_files,
)
from alignpipe.util.yamlsafe import YamlInputError, load_yaml

if TYPE_CHECKING:
    from rich.console import Console

    from alignpipe.data.store import LatentStore
    from alignpipe.methods.asif import Asif
    from alignpipe.methods.base import Method

    StoreLike = str | Path | LatentStore

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
    cached: bool = False  # True when `fit` found this finished run in --out and did nothing

    def to_dict(self) -> dict:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        del out["cached"]
        return out

    @classmethod
    def read(cls, out: Path) -> FitSummary:
        """The summary a finished run left in run.json (one line naming it when damaged)."""
        path = Path(out) / SUMMARY
        try:
            summary = cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            raise AlignpipeError(f"{path}: damaged run summary; refit with --overwrite") from None
        summary.run_dir = Path(out)  # where the run is now (it may have moved since)
        return summary

    @classmethod
    def from_dict(cls, data: dict) -> FitSummary:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{**known, "run_dir": Path(known["run_dir"])})


# Where a store lies, as opposed to what it is: runs compare stores by what they are, so a project
# moved or renamed as a whole (manifest, cache and runs) still holds the same runs.
LOCATION_KEYS = ("path", "relative_path")


def store_identity(store: LatentStore, out: str | Path | None = None) -> dict:
    """A store as a run records it: where it is (its absolute path and, given the run folder
    `out`, its path relative to that folder when both lie under one folder below the filesystem
    root) and what it is (modality, dim, rows, encoder, manifest sha256)."""
    path = Path(store.path).resolve()
    record = {"path": str(path)}
    relative = _relative_location(path, out) if out is not None else None
    if relative is not None:
        record["relative_path"] = relative
    return {**record, "modality": store.modality, "dim": store.dim, "rows": store.rows,
            "encoder": encoder_identity(store),
            "manifest_sha256": store.manifest_info.get("sha256")}


def _relative_location(path: Path, out: str | Path) -> str | None:
    out = Path(out).resolve()
    try:
        common = Path(os.path.commonpath([path, out]))
    except ValueError:  # different drives
        return None
    return None if common == Path(common.anchor) else os.path.relpath(path, out)


def run_identity(method: str, config: dict, a: LatentStore, b: LatentStore,
                 out: str | Path | None = None) -> dict:
    """Everything that decides a run's result (same identity, same run), plus where its stores
    lie (see `store_identity`; `same_identity` leaves that out)."""
    return {"method": method,
            "stores": {"a": store_identity(a, out), "b": store_identity(b, out)},
            "config": config}


def _what(identity: dict) -> dict:
    """`identity` without where its stores (and those of its `also` pairs) lie."""
    def unplaced(stores: dict) -> dict:
        return {side: {k: v for k, v in record.items() if k not in LOCATION_KEYS}
                for side, record in stores.items()}

    what = {**identity, "stores": unplaced(identity["stores"])}
    if identity.get("also"):
        what["also"] = [unplaced(pair) for pair in identity["also"]]
    return what


def _comparable(old: dict, new: dict) -> tuple[dict, dict]:
    old, new = _what(old), _what(new)
    old_config, new_config = old.get("config") or {}, new.get("config") or {}
    if (isinstance(old_config, dict) and "loss" not in old_config
            and new_config.get("loss") == DEFAULT_LOSS):  # a run recorded before the loss key
        new["config"] = {k: v for k, v in new_config.items() if k != "loss"}
    for side, record in old["stores"].items():  # a run recorded before stores had rows
        if "rows" not in record:
            new["stores"].get(side, {}).pop("rows", None)
    return old, new


def same_identity(old: dict, new: dict) -> bool:
    """Same method, config and stores (by what they are, wherever they lie now)."""
    old, new = _comparable(old, new)
    return old == new


def identity_differences(old: dict, new: dict) -> list[str]:
    """Each difference of what two runs are, as ``key: old → new``."""
    return _differences(*_comparable(old, new))


def store_locations(out: str | Path, record: dict) -> list[Path]:
    """Where a run's store may be: relative to the run folder first (a project moved or copied
    as a whole), then at the absolute path recorded when the run was made."""
    found = []
    if isinstance(record.get("relative_path"), str):
        found.append((Path(out).resolve() / record["relative_path"]).resolve())
    found.append(Path(record["path"]))
    return list(dict.fromkeys(found))


def _store_differences(record: dict, store: LatentStore) -> list[str]:
    want = {k: v for k, v in record.items() if k not in (*LOCATION_KEYS, "partial")}
    found = _what({"stores": {"x": store_identity(store)}})["stores"]["x"]
    if "rows" not in want:
        found.pop("rows", None)
    return _differences(want, found)


def locate_store(out: str | Path, record: dict, side: str, hint: str,
                 candidates: Iterable[StoreLike] = ()) -> LatentStore:
    """The store a run recorded for `side`, wherever it lies now: relative to the run folder,
    at its recorded path, or among `candidates` (stores given with the command), whichever is
    that store by what it is. Otherwise a StoreError naming the store, where it was looked for,
    and `hint` (how to say where it is now)."""
    from alignpipe.util.errors import StoreError

    seen = []
    for where in [*store_locations(out, record), *candidates]:
        if isinstance(where, Path) and not where.exists():
            continue
        try:
            store = as_store(where)
        except AlignpipeError as err:
            seen.append(str(err).split("\n")[0][:200])
            continue
        diff = _store_differences(record, store)
        if not diff:
            return store
        if isinstance(where, Path):  # a store given with the command need not be this one
            seen.append(f"{store.path} is another store ({'; '.join(diff[:3])})")
    encoder = (record.get("encoder") or {}).get("name", "?")
    looked = ", ".join(map(str, store_locations(out, record)))
    raise StoreError(
        f"{out}: the run's {side} store ({record.get('modality')} latents of {encoder}, "
        f"manifest sha256 {str(record.get('manifest_sha256'))[:12]}…) is not at {looked}"
        + (f" ({'; '.join(seen)})" if seen else "") + f"; {hint}")


def record_locations(out: Path, identity: dict) -> None:
    """Point the run's config.yaml at where its stores lie now (after they moved), so that
    `--resume` alone and `load_run` find them there."""
    path = Path(out) / CONFIG
    data = load_yaml(path)
    stores = data.get("stores") if isinstance(data, dict) else None
    if not isinstance(stores, dict):
        return
    changed = False
    for side, now in identity["stores"].items():
        record = stores.get(side)
        if not isinstance(record, dict):
            continue
        for key in LOCATION_KEYS:
            if record.get(key) != now.get(key):
                changed = True
                if key in now:
                    record[key] = now[key]
                else:
                    record.pop(key, None)
    if changed:
        _atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def _atomic_write(path: Path, data: bytes | str) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor],
                 metadata: dict | None = None) -> None:
    """safetensors, atomically: a kill leaves the old file or the new one, never half of one."""
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={k: str(v) for k, v in (metadata or {}).items()})
        except SafetensorError as exc:  # its I/O errors are no OSError: a full disk is one line
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            errno = int(code.group(1))
            raise OSError(errno, os.strerror(errno), str(path)) from exc


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
    for key in ("select", "also"):  # a fit on curated rows, on more pairs (`--select`, `--also`)
        if data.get(key):
            if not isinstance(data[key], list):
                raise AlignpipeError(f"{path}: damaged run config: {key} must be a list")
            identity[key] = data[key]
    return identity


def _check_identity(identity: dict, path: Path) -> None:
    """Refuse a config.yaml whose values are of the wrong kind or out of range."""
    from alignpipe.methods import is_registered

    def bad(what: str) -> AlignpipeError:
        return AlignpipeError(f"{path}: damaged run config: {what}")

    method, stores, config = identity["method"], identity["stores"], identity["config"]
    if not isinstance(method, str) or not is_registered(method):
        raise bad(f"method {method!r} is not a registered method")
    if not isinstance(stores, dict) or set(stores) != {"a", "b"}:
        raise bad("stores must map a and b to the two stores")
    for side, store in stores.items():
        if not isinstance(store, dict) or not isinstance(store.get("path"), str):
            raise bad(f"stores.{side} must hold the store's path")
        if not isinstance(store.get("relative_path", ""), str):
            raise bad(f"stores.{side}.relative_path must be a string")
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


def run_state(out: str | Path, store_a: StoreLike, store_b: StoreLike, *, method: str,
              config: str | Path | dict | None = None, overrides: dict | None = None,
              select: str | Path | Iterable[str | Path] | None = None,
              also: Iterable[tuple[StoreLike, StoreLike]] = ()) -> str:
    """``missing``, ``complete``, ``incomplete`` (same run, killed) or ``different``."""
    old = read_identity(Path(out))
    if old is None:
        return "missing"
    a, b = as_store(store_a), as_store(store_b)
    identity = run_identity(method, resolve_config(method, config, overrides), a, b)
    pairs = [(as_store(x), as_store(y)) for x, y in also or ()]
    if pairs:  # more training pairs (fit's `also`) are part of what the run is
        identity["also"] = [{"a": store_identity(x), "b": store_identity(y)} for x, y in pairs]
    if select:  # a fit on selections is that fit only with the same selections
        from alignpipe.curate.selection import selection_identity

        identity["select"] = selection_identity(select)
    if not same_identity(old, identity):
        return "different"
    return "complete" if (Path(out) / SUMMARY).exists() else "incomplete"


def run_is_complete(out: str | Path, store_a: StoreLike, store_b: StoreLike, *, method: str,
                    config: str | Path | dict | None = None,
                    overrides: dict | None = None) -> bool:
    """True when `out` holds a finished run with this exact resolved config and these stores."""
    return run_state(out, store_a, store_b, method=method, config=config,
                     overrides=overrides) == "complete"


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One writer per run folder: a second `fit` into it (say a `fit --resume` started while the
    first still runs) is refused instead of appending a second copy of the metrics."""
    out = Path(out).absolute()
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        with exclusive_lock(out.with_name(f".{out.name}.lock"), f"run folder {out}"):
            yield
    finally:
        if not out.exists():  # refused (or failed) before writing anything: leave no folders
            for folder in created[1:]:  # deepest first; the lock made them
                try:
                    folder.rmdir()
                except OSError:  # not empty (someone else wrote there) or not removable
                    break


def clear_run_folder(out: Path) -> list[str]:
    """Remove everything alignpipe wrote into a run folder: the run's files, eval results
    written there (``eval-*``, or any name given to ``eval --output``), and temp files of killed
    writers. Returns what was removed; other files (a user's notes) stay."""
    removed = []
    if not out.is_dir():
        return removed
    results = {p.with_suffix("") for p in out.glob("*.json") if _eval_of_this_run(p)}
    for path in sorted(out.iterdir()):
        if path.is_file() and (path.name in RUN_FILES or path.name.startswith(EVAL_PREFIX)
                               or (path.suffix in (".json", ".md", ".png")
                                   and path.with_suffix("") in results)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    remove_temp_files(out)
    return removed


def _eval_of_this_run(path: Path) -> bool:
    """A result `alignpipe eval --run FOLDER --output FOLDER/NAME.json` wrote under any name."""
    try:
        if path.stat().st_size > 64 << 20:
            return False
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    produced = result.get("produced_by") if isinstance(result, dict) else None
    return (isinstance(produced, dict) and produced.get("run") == "."
            and isinstance(result.get("heads"), dict))


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
    same = same_identity(old, identity)
    if not same and resume and not finished and _retune(out, old, identity):
        return "resume"
    if not same:
        changes = "; ".join(identity_differences(old, identity)[:8])
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
    if not (out / DIVERGED).exists() or not same_identity(
            {**old, "config": {}}, {**identity, "config": {}}):
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

    def __init__(self, path: Path, echo: bool) -> None:
        self.path = path
        self.echo = echo
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The terminal console; the progress bar shares it so log lines print above it."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def __call__(self, line: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with os_errors(self.path), open(self.path, "a") as handle:
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
    """A safetensors file's metadata, or one line naming it when it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AlignpipeError(f"{path}: damaged, not a readable safetensors file "
                             f"({' '.join(str(err).split())[:160]})") from None


def load_into(method: Method, tensors: dict[str, torch.Tensor], path: Path, what: str) -> None:
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
        """The side (a or b) whose store holds `modality`, or None."""
        for side in ("a", "b"):
            if self.identity["stores"][side]["modality"] == modality:
                return side
        return None


def load_run(run: str | Path, device: str | torch.device | None = None, which: str = "best",
             stores: Iterable[StoreLike] = ()) -> LoadedRun:
    """Rebuild a fitted method from its run folder (heads, or asif's anchors from the stores).

    An asif run reads its anchors from the stores it was fitted on, found relative to the run
    folder, at their recorded paths, or among `stores` (those an eval was given), see
    `locate_store`."""
    path = Path(run)
    identity = read_identity(path)
    if identity is None:
        raise AlignpipeError(f"{path}: not a run folder (no {CONFIG})")
    if not (path / SUMMARY).exists():
        raise AlignpipeError(f"{path}: the run has not finished (no {SUMMARY}); continue it "
                             f"with `alignpipe fit ... --out {path} --resume`")
    dev = resolve_device(device)
    dims = [identity["stores"][side]["dim"] for side in ("a", "b")]
    method = create_method(identity["method"], resolve_config(identity["method"],
                                                              identity["config"]), *dims)
    if method.trained:
        heads = path / (HEADS_BEST if which == "best" else HEADS_LAST)
        load_into(method, read_tensors(heads, "heads"), heads, "heads")
    else:
        _load_anchors(method, path, identity["stores"], dev, identity["config"], stores)
    return LoadedRun(path, method.to(dev), identity)


def _load_anchors(method: Asif, path: Path, stores: dict, device: torch.device, cfg: dict,
                  candidates: Iterable[StoreLike] = ()) -> None:
    from alignpipe.data.pairing import load_rows

    load_into(method, read_tensors(path / ANCHORS, "anchor list"), path / ANCHORS,
              "anchor list")
    hint = (f"the asif run reads its anchors from it: give it to eval if it is one of the "
            f"stores scored, or record where the stores are now with `alignpipe fit STORE_A "
            f"STORE_B --out {path} --resume` (a finished run is not refitted)")
    candidates = [as_store(c) for c in candidates]
    opened = {}
    for side in ("a", "b"):
        store = locate_store(path, stores[side], side, hint, candidates)
        opened[side] = load_rows(store, method.anchor_rows, device,
                                 storage_dtype(device, cfg.get("storage_dtype", "auto")))
    method.set_anchors(opened["a"], opened["b"], method.anchor_rows)
