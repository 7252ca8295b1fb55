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
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from alignpipe import __version__
from alignpipe.errors import AlignpipeError
from alignpipe.fit.config import (
    COMMON_DEFAULTS,
    TRAIN_DEFAULTS,
    default_config,
    resolve_config,
)
from alignpipe.fit.loop import Trainer, validate
from alignpipe.fit.runfolder import (
    ANCHORS,
    CHECKPOINT,
    CONFIG,
    LOG,
    METRICS,
    SUMMARY,
    FitSummary,
    LoadedRun,
    RunLog,
    _atomic_write,
    _prepare_folder,
    load_run,
    read_metrics,
    run_identity,
    run_is_complete,
    run_state,
    save_tensors,
)
from alignpipe.latents import load_pairs, open_pair, resolve_device, storage_dtype, train_val_rows
from alignpipe.methods import create_method

__all__ = ["COMMON_DEFAULTS", "TRAIN_DEFAULTS", "FitSummary", "LoadedRun", "default_config",
           "fit", "load_run", "read_metrics", "resolve_config", "run_is_complete", "run_state"]


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
