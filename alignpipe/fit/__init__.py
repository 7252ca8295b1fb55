"""Stage two: train alignment heads on two stores of one manifest, with the loop written once.

``fit(store_a, store_b, method="fusemix", out="runs/x")`` loads the valid training rows of both
stores onto the device once, draws every batch by an on-device permutation (no per-sample
DataLoader), validates on the manifest's val split each epoch, keeps the best heads by val
recall, and can resume a killed run exactly. The run folder::

    config.yaml              method, stores (path, path from the run folder, modality, dim,
                             rows, encoder, manifest sha), config
    log.txt                  what happened, including batch-size reductions and dropped rows
    metrics.jsonl            one line per epoch: loss, lr, temperature, val recall, pairs/s
    heads-best.safetensors   heads of the best val epoch (what eval loads)
    heads-last.safetensors   heads after the last epoch
    checkpoint.safetensors   last heads + AdamW state + epoch, for --resume
    anchors.safetensors      asif only: the anchor rows (the latents stay in the stores)
    curves.png               loss and val recall per epoch: drawn by the app's CurvesPNG
                             callback (the CLI and pipeline register it), not by fit() itself
    diverged.json            only after the loss went non-finite: where; a resume may retune
    run.json                 the summary; written last, so its presence means "finished"

A lock file ``.NAME.lock`` beside the folder keeps a second writer out while a fit runs; a fit
refused before it wrote anything leaves no folder behind. A run is the same run wherever its
stores lie (they are compared by what they are), so a project moved as a whole keeps its runs:
``--resume`` alone and an asif run's anchors find the stores relative to the run folder.

``callbacks=[...]`` receives the training loop's events (fit start, each validated epoch with the
metrics so far, fit end; see fit/callbacks.py): how the app draws curves.png, and how a caller
follows a fit without reading metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from alignpipe._version import __version__
from alignpipe.curate.selection import selection_record
from alignpipe.data.pairing import (
    check_encoder,
    encoder_identity,
    load_pairs,
    open_pair,
    partial_notes,
    resolve_device,
    storage_dtype,
    train_val_rows,
)
from alignpipe.data.pairs import Pairs
from alignpipe.fit.callbacks import Callbacks, FitCallback
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
    DIVERGED,
    LOG,
    METRICS,
    SUMMARY,
    FitSummary,
    LoadedRun,
    RunLog,
    _atomic_write,
    _prepare_folder,
    clear_run_folder,
    load_run,
    locate_store,
    read_identity,
    read_metrics,
    record_locations,
    run_identity,
    run_is_complete,
    run_lock,
    run_state,
    save_tensors,
    store_identity,
)
from alignpipe.methods import create_method
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import DiskError, os_errors
from alignpipe.util.yamlsafe import load_yaml

if TYPE_CHECKING:
    from alignpipe.curate.selection import Selection
    from alignpipe.data.manifest import Manifest
    from alignpipe.data.pairing import ManifestArg
    from alignpipe.data.store import LatentStore

    StoreLike = str | Path | LatentStore
    SelectArg = str | Path | Iterable[str | Path] | None
    AlsoArg = Iterable[tuple[StoreLike, StoreLike]]

# Below this many val pairs, recall moves by ≥ 1 point per pair and cannot choose an epoch.
MIN_VAL_PAIRS = 100

__all__ = ["COMMON_DEFAULTS", "TRAIN_DEFAULTS", "FitCallback", "FitSummary", "LoadedRun",
           "default_config", "fit", "load_run", "read_metrics", "resolve_config",
           "run_is_complete", "run_state"]


def fit(store_a: StoreLike | None = None, store_b: StoreLike | None = None, *,
        method: str | None = None, out: str | Path, config: str | Path | dict | None = None,
        overrides: dict | None = None, resume: bool = False,
        device: str | torch.device | None = None, progress: bool = True,
        callbacks: Callbacks | Iterable[FitCallback] = (), select: SelectArg = None,
        also: AlsoArg = (), **options: Any) -> FitSummary:
    """Train (or, for asif, collect anchors for) an alignment of two stores into `out`.

    A finished run with the same config and stores is returned as it is; an unfinished one
    needs ``resume=True``; a different one in `out` needs ``overwrite=True``, which first clears
    the folder of everything alignpipe wrote there (eval results included). On a resume the
    run's saved method, stores and config are the defaults: ``fit(out=run, resume=True)`` alone
    continues it, and any value given that differs from the saved one is refused by name; the
    saved stores are looked for relative to `out` first, then at their recorded paths. A finished
    or resumed run whose stores moved records where they are now (``summary.cached`` says a
    finished run was found and nothing was fitted).
    One process at a time writes a run folder (a lock beside it). `callbacks`: objects with any
    of on_fit_start / on_epoch_end / on_fit_end (fit/callbacks.py), called by the training loop;
    no figure is drawn without one (the CLI passes `alignpipe.app.render.CurvesPNG`). `options`:
    `overwrite`, `manifest`, `allow_partial` (see `_fit`). `select`: one selection file (from
    `alignpipe curate`) or several; training then uses only their rows of the train split
    (validation is unchanged), and the run records each selection's path and sha256.
    `also`: more ``(store_a, store_b)`` pairs of other manifests, embedded with the same two
    encoders, whose train-split rows are trained on too (freeze-align: curated LAION plus
    CC3M/CC12M); a selection applies to the pair whose manifest it names, and validation is
    the first pair's.
    """
    callbacks = Callbacks(callbacks)  # a wrong object is refused before anything is touched
    out = Path(out)
    with run_lock(out):
        saved = read_identity(out) if resume and not options.get("overwrite") else None
        if saved is not None:
            method = method or saved["method"]
            hint = (f"pass both stores where they are now: `alignpipe fit STORE_A STORE_B --out "
                    f"{out} --resume`")
            if store_a is None:
                store_a = locate_store(out, saved["stores"]["a"], "a", hint)
            if store_b is None:
                store_b = locate_store(out, saved["stores"]["b"], "b", hint)
            if not also and saved.get("also"):  # the run's other training pairs, as saved
                also = [(locate_store(out, pair["a"], "also a", hint),
                         locate_store(out, pair["b"], "also b", hint)) for pair in saved["also"]]
        method = method or "fusemix"
        if store_a is None or store_b is None:
            raise AlignpipeError(f"{out}: fit needs two stores (only `--resume` of an existing "
                                 f"run takes them from its config.yaml)")
        base = saved["config"] if saved is not None and saved["method"] == method else None
        return _fit(store_a, store_b, method=method, out=out, config=config, overrides=overrides,
                    resume=resume, device=device, progress=progress, base=base,
                    callbacks=callbacks, select=select, also=also, **options)


def _fit(store_a: StoreLike, store_b: StoreLike, *, method: str, out: str | Path,
         config: str | Path | dict | None = None, overrides: dict | None = None,
         resume: bool = False, device: str | torch.device | None = None,
         progress: bool = True, base: dict | None = None, callbacks: Callbacks | None = None,
         overwrite: bool = False, manifest: ManifestArg = None, allow_partial: bool = False,
         select: SelectArg = None, also: AlsoArg = ()) -> FitSummary:
    """`fit` under the run folder's lock; `base` is the saved config a resume starts from.

    A finished run with the same config and stores is returned as it is; an unfinished one
    needs ``resume=True``; a different one in `out` needs ``overwrite=True``. `manifest` says
    where the stores' manifest is now (when it moved without them); `allow_partial` trains on
    unfinished stores' rows embedded so far.
    """
    started = time.perf_counter()
    a, b, manifest = open_pair(store_a, store_b, manifest=manifest, allow_partial=allow_partial)
    cfg = resolve_config(method, config, overrides, base=base)
    out = Path(out)
    identity = run_identity(method, cfg, a, b, out)
    sources = open_sources(a, b, manifest, also, allow_partial)
    if len(sources) > 1:  # more training pairs are part of what the run is
        identity["also"] = [{"a": store_identity(s.a, out), "b": store_identity(s.b, out)}
                            for s in sources[1:]]
    selections = open_selections(select, sources)
    if selections:  # part of what the run is (by content, wherever the files lie)
        identity["select"] = [{"sha256": r["sha256"], "rows": r["rows"]}
                              for r in map(selection_record, selections)]
    for side, store in (("a", a), ("b", b)):
        if not store.complete:  # a fit on part of a store is not the fit on all of it
            identity["stores"][side]["partial"] = (f"{len(store.done_units())} of "
                                                   f"{store.n_units} units")
    state = _prepare_folder(out, identity, resume, overwrite)
    if state in ("done", "resume"):  # the same run; its stores (or the folder) may have moved
        record_locations(out, identity)
    if state == "done":
        summary = FitSummary.read(out)
        summary.cached = True
        return summary
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if state == "new":
        _atomic_write(out / CONFIG, yaml.safe_dump(
            {**identity, "manifest": a.manifest_info, "alignpipe_version": __version__,
             **({"selections": [selection_record(s) for s in selections]} if selections
                else {})},
            sort_keys=False))
    try:
        with os_errors(out):  # a full disk or read-only folder is one line naming the path
            return _run(a, b, manifest, method, cfg, out, state, device, progress, started,
                        callbacks or Callbacks(), sources)
    except AlignpipeError as err:
        # A run refused (or diverged) before its first good checkpoint leaves nothing behind to
        # "resume", not even heads: a leftover file would make the folder "not a run".
        if state == "new" and not (out / CHECKPOINT).exists():
            clear_run_folder(out)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, DiskError) and (out / CHECKPOINT).exists():
            raise DiskError(f"{err} with --resume (the run's checkpoint is kept)") from None
        raise


def _run(a: LatentStore, b: LatentStore, manifest: Manifest, method: str, cfg: dict,
         out: Path, state: str, device: str | torch.device | None, progress: bool,
         started: float, callbacks: Callbacks,
         sources: list[TrainSource] | None = None) -> FitSummary:
    dev = resolve_device(device)
    log = RunLog(out / LOG, echo=progress)
    log(f"fit {method}: {a.modality} {a.path} (dim {a.dim}) ↔ {b.modality} {b.path} "
        f"(dim {b.dim}) on {dev}")
    for note in partial_notes([a, b]):
        log(note)
    if state == "resume" and (out / DIVERGED).exists():
        retuned = (load_yaml(out / CONFIG) or {}).get("retuned") or [{}]
        changes = retuned[-1].get("changes", {})
        log("resuming a run whose loss diverged" + (": " + ", ".join(
            f"{k} {v[0]} → {v[1]}" for k, v in changes.items()) if changes else ""))
    torch.manual_seed(cfg["seed"])
    sources = sources or [TrainSource(a, b, manifest)]
    selections = [s for source in sources for s in source.selections]
    train, val, dropped = _load_splits(sources, cfg, dev, log)
    model = create_method(method, cfg, a.dim, b.dim).to(dev)
    names = (a.modality, b.modality)
    warnings = _validation_warnings(len(val), model.trained)
    for line in warnings:
        log(f"warning: {line}")
    if model.trained:
        trainer = Trainer(out, cfg, dev, log, progress, names, resume=state == "resume",
                          callbacks=callbacks)
        model.fit(train, val, loop=trainer)
        history = read_metrics(out)
        best = next((m for m in history if m["epoch"] == trainer.best_epoch), None)
        if best is None:  # every validation had non-finite encodings: nothing to choose
            raise AlignpipeError(
                f"{out}: no epoch gave finite encodings on the val split (epochs "
                f"{', '.join(str(m['epoch']) for m in history)}): the heads diverged and "
                f"none is usable, so nothing is kept; start again with a lower lr, "
                f"--set grad_clip=1 or --set precision=fp32")
        rate = trainer.pairs_seen / max(trainer.train_seconds, 1e-9)
        epochs, best_epoch, batch = cfg["epochs"], trainer.best_epoch, trainer.batch
        steps = trainer.total_steps
    else:
        model.fit(train, val)
        for line in getattr(model, "warnings", []):
            log(f"warning: {line}")
            warnings.append(line)
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
        device=str(dev), warnings=warnings)
    _atomic_write(out / SUMMARY, json.dumps({**summary.to_dict(), "complete": True,
                                             **({"selections": [selection_record(s)
                                                                for s in selections]}
                                                if selections else {}),
                                             "finished": datetime.now(timezone.utc).isoformat(
                                                 timespec="seconds")}, indent=2))
    (out / DIVERGED).unlink(missing_ok=True)  # a retuned resume got past the divergence
    log(f"done in {summary.wall_s:.1f} s: best epoch {best_epoch}, "
        f"val mean recall {best['val'].get('mean_recall', float('nan')):.2f}")
    return summary


def _validation_warnings(val_pairs: int, trained: bool) -> list[str]:
    """Say when the val split cannot choose anything (the hashed fallback on a small manifest)."""
    if val_pairs == 0:
        return (["no validation pairs: the epoch of lowest training loss is kept as best; add "
                 "a val split (or raise val_fraction) to choose by recall"] if trained else [])
    if val_pairs < MIN_VAL_PAIRS:
        what = "the best epoch" if trained else "the val recall"
        return [f"only {val_pairs} validation pairs (fewer than {MIN_VAL_PAIRS}): {what} is "
                f"chosen on noise (one pair moves recall by {100 / val_pairs:.1f} points); add "
                f"val rows or raise val_fraction"]
    return []


@dataclass
class TrainSource:
    """One pair of stores that training rows come from, with the selections of its manifest."""

    a: LatentStore
    b: LatentStore
    manifest: Manifest
    selections: list[Selection] = field(default_factory=list)


def open_sources(a: LatentStore, b: LatentStore, manifest: Manifest, also: AlsoArg,
                 allow_partial: bool = False) -> list[TrainSource]:
    """The run's pair, then each `also` pair: stores of another manifest, embedded with the same
    encoders (each side's identity checked against the first pair's)."""
    sources = [TrainSource(a, b, manifest)]
    for extra_a, extra_b in also or ():
        a2, b2, m2 = open_pair(extra_a, extra_b, allow_partial=allow_partial)
        if (a2.modality, b2.modality) != (a.modality, b.modality):
            raise AlignpipeError(f"--also {a2.path} {b2.path}: holds {a2.modality}–"
                                 f"{b2.modality} latents, the run aligns {a.modality}–"
                                 f"{b.modality} (give the stores in the same order)")
        check_encoder(a2, encoder_identity(a), "a")
        check_encoder(b2, encoder_identity(b), "b")
        if any(s.manifest.sha256 == m2.sha256 for s in sources):
            raise AlignpipeError(f"--also {a2.path} {b2.path}: stores of a manifest the run "
                                 f"already trains on ({m2.path}); give each manifest once")
        sources.append(TrainSource(a2, b2, m2))
    return sources


def open_selections(select: SelectArg, sources: list[TrainSource]) -> list[Selection]:
    """The selections to train on, each given to the pair whose manifest it names (refused,
    naming the file, when it names none of them)."""
    if select is None:
        return []
    from alignpipe.curate.selection import check_selection, read_selection

    items = [select] if isinstance(select, (str, Path)) else list(select)
    selections = [read_selection(item) for item in items]
    for selection in selections:
        source = next((s for s in sources if s.manifest.sha256 == selection.manifest_sha256),
                      sources[0])  # none matches: checked against the run's own, which refuses
        check_selection(selection, source.manifest)
        source.selections.append(selection)
    return selections


def _source_rows(source: TrainSource, cfg: dict, log: RunLog,
                 first: bool) -> tuple[np.ndarray, np.ndarray]:
    """A pair's train rows (its selected ones, when selections name its manifest) and val rows
    (the first pair's only: the others only add training rows)."""
    train_rows, val_rows, how = train_val_rows(source.manifest, cfg["val_fraction"])
    log(how if first else f"{source.manifest.path}: {train_rows.size} more training rows")
    if source.selections:  # the selected rows of the train split only; val as always
        chosen = np.unique(np.concatenate([s.rows for s in source.selections]))
        before = train_rows.size
        train_rows = np.intersect1d(train_rows, chosen)
        log(f"selection {', '.join(str(s.path) for s in source.selections)}: {chosen.size} "
            f"rows selected, {train_rows.size} of {before} training rows kept (selected rows "
            f"of other splits are not trained on)")
    return train_rows, val_rows if first else val_rows[:0]


def _concat(parts: list[Pairs], offsets: list[int]) -> Pairs:
    """Training pairs of several manifests as one; rows and items are numbered apart."""
    if len(parts) == 1:
        return parts[0]
    items_a, items_b, base_a, base_b = [], [], 0, 0
    for part in parts:
        items_a.append(part.items_a + base_a)
        items_b.append(part.items_b + base_b)
        base_a += int(part.items_a.max()) + 1 if len(part) else 0
        base_b += int(part.items_b.max()) + 1 if len(part) else 0
    return Pairs(a=torch.cat([p.a for p in parts]), b=torch.cat([p.b for p in parts]),
                 rows=np.concatenate([p.rows + o for p, o in zip(parts, offsets, strict=True)]),
                 items_a=np.concatenate(items_a), items_b=np.concatenate(items_b))


def _load_splits(sources: list[TrainSource], cfg: dict, device: torch.device,
                 log: RunLog) -> tuple[Pairs, Pairs, dict[str, int]]:
    a, b, manifest = sources[0].a, sources[0].b, sources[0].manifest
    dtype = storage_dtype(device, cfg.get("storage_dtype", "auto"))
    trains, offsets, offset = [], [], 0
    lost_train, wanted = [0, 0], 0
    for i, source in enumerate(sources):
        train_rows, rows_val = _source_rows(source, cfg, log, first=i == 0)
        if i == 0:
            val_rows = rows_val
        part, lost = load_pairs(source.a, source.b, source.manifest, train_rows, device, dtype)
        trains.append(part)
        offsets.append(offset)
        offset += source.manifest.rows
        wanted += train_rows.size
        lost_train = [lost_train[0] + lost[0], lost_train[1] + lost[1]]
    train = _concat(trains, offsets)
    dtype = storage_dtype(device, cfg.get("storage_dtype", "auto"))
    val, lost_val = load_pairs(a, b, manifest, val_rows, device, dtype)
    dropped = {"train": wanted - len(train), "val": val_rows.size - len(val),
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
