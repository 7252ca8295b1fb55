"""`embed` and `embed_status`: the stage-one entry points the CLI and the pipeline call.

A store's identity is the request that made it (encoder name, weights hash, pooling, image size,
column, prefix), the manifest's sha256 and the latent dtype. A rerun with the same identity
resumes, skipping finished work units; a different identity is refused unless ``overwrite``.
The batch size is part of it too, for resuming: batched kernels round differently at another
batch size, so a resume keeps the store's batch size (refusing an explicit other one) and the
finished store equals an uninterrupted run bit for bit. One `embed` at a time writes a store
(`lock_store`); a second is refused.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignpipe.data.manifest import FILE_COLUMNS, MEDIA_COLUMNS, Manifest, read_manifest
from alignpipe.data.store import (
    LATENT_DTYPES,
    LatentStore,
    is_store,
    lock_store,
    open_store,
    store_path,
)
from alignpipe.embed.engine import DECODE_TIMEOUT_S
from alignpipe.encoders import (
    EncoderSpec,
    WeightsSource,
    get_encoder_spec,
    resolve_spec,
    resolve_weights,
)
from alignpipe.encoders.registry import AUTO_BACKEND
from alignpipe.util.errors import AlignpipeError, StoreError
from alignpipe.util.names import plain_name_problem

if TYPE_CHECKING:
    from alignpipe.embed.runner import Outcome

CPU_BATCH_CAP = 32


class EmbedError(AlignpipeError):
    """Stage one cannot run as asked (bad option, store conflict, failed work units)."""


class FailureRateError(EmbedError):
    """More rows failed than --max-failure-rate allows; the store itself is finished."""

    exit_code = 3

    def __init__(self, message: str, summary: EmbedSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class EmbedSummary:
    """What one `embed` call did. rows/valid/failed describe the whole store after the call;
    `rows_per_s` counts the rows embedded by this call over its encoding time (model loading
    excluded); `wall_s` is the whole call."""

    path: Path
    rows: int
    valid: int
    failed: int
    skipped_units: int
    units: int
    rows_per_s: float
    wall_s: float
    embedded_rows: int = 0
    encoded_items: int = 0
    failures_path: Path | None = None
    encoder: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        out["failures_path"] = str(self.failures_path) if self.failures_path else None
        return out

    def line(self) -> str:
        rate = self.failed / self.rows if self.rows else 0.0
        ran = self.units - self.skipped_units
        return (f"{self.encoder}: {self.rows} rows, {self.valid} valid, {self.failed} failed "
                f"({rate:.2%}); {ran} of {self.units} work units embedded, "
                f"{self.skipped_units} skipped (already done); {self.rows_per_s:.0f} rows/s; "
                f"{self.wall_s:.1f} s wall → {self.path}")


@dataclass(frozen=True)
class Request:
    """The resolved options of one embed call: plain data, cheap to build and to ship."""

    spec: EncoderSpec
    source: WeightsSource
    column: str | None
    image_size: int | None
    pooling: str | None
    latent_dtype: str

    def identity(self) -> dict:
        """What must match for an existing store to be resumed rather than refused."""
        return {"encoder": self.spec.name, "weights": self.source.kind,
                "weights_sha256": self.source.sha256, "pooling": self.pooling,
                "image_size": self.image_size, "column": self.column,
                "prefix": self.spec.prefix,
                # The resize/crop ratio: a store begun with another crop must not be resumed
                # (None for encoders whose processor decides; old stores recorded no value).
                "crop_pct": self.spec.crop_pct}


def _manifest(manifest: str | Path | Manifest) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else read_manifest(manifest)


def dataset_name(dataset: str | None, manifest: Manifest) -> str:
    """The store's dataset folder: one plain folder name, so a store never lands outside
    ``<cache>`` (``--dataset ../../x`` is refused)."""
    name = manifest.name if dataset is None else str(dataset)
    if plain_name_problem(name, "--dataset") is not None:
        what = "--dataset" if dataset is not None else f"{manifest.path}: the manifest's name"
        raise EmbedError(f"{what} {name!r} is not a plain folder name (no '/', '\\' or '..'): "
                         f"the store goes to <cache>/<dataset>/<encoder>; give --dataset NAME")
    return name


def check_column(column: str, modality: str, encoder: str) -> None:
    """Refuse a media column of another modality than the encoder's: a text encoder given the
    image column would embed its path strings as captions, with every row 'valid'."""
    if column not in MEDIA_COLUMNS or column == modality:
        return
    held = f"{column} file paths" if column in FILE_COLUMNS else "text"
    article = "an" if modality[0] in "aeiou" else "a"
    raise EmbedError(f"--column {column} holds {held}, but {encoder} is {article} {modality} "
                     f"encoder; give a column of {modality} (the default is --column "
                     f"{modality}) or an encoder for {column}")


def make_request(encoder: str, *, column: str | None, weights: str | Path | None,
                 image_size: int | None,
                 pooling: str | None, latent_dtype: str) -> Request:
    spec = get_encoder_spec(encoder)
    if latent_dtype not in LATENT_DTYPES:
        raise EmbedError(f"--latent-dtype {latent_dtype!r}: use one of "
                         f"{', '.join(LATENT_DTYPES)}")
    if image_size is not None and image_size < 1:
        raise EmbedError(f"--image-size must be a positive number of pixels, got {image_size}")
    if image_size is not None and spec.modality not in ("image", None):
        raise EmbedError(f"--image-size applies to image encoders; {encoder} reads "
                         f"{spec.modality}")
    if pooling is not None and spec.backend != AUTO_BACKEND and pooling not in spec.poolings:
        raise EmbedError(f"--pooling {pooling!r} is not available for {encoder}; use one of "
                         f"{', '.join(spec.poolings)}")
    return Request(spec=spec, source=resolve_weights(spec, weights),
                   column=column or spec.modality, image_size=image_size or spec.image_size,
                   pooling=pooling or spec.pooling, latent_dtype=latent_dtype)


def _differences(store: LatentStore, request: Request, manifest: Manifest) -> list[str]:
    stored = dict(store.encoder.get("request", {}))
    wanted = request.identity()
    diffs = [f"{key}: store has {stored.get(key)!r}, asked for {wanted[key]!r}"
             for key in wanted if stored.get(key) != wanted[key]]
    if store.manifest_info.get("sha256") != manifest.sha256:
        diffs.append(f"manifest: store was built from {store.manifest_info.get('path')} "
                     f"(sha256 {str(store.manifest_info.get('sha256'))[:12]}…), this is "
                     f"{manifest.path} (sha256 {manifest.sha256[:12]}…)")
    if store.dtype != request.latent_dtype:
        diffs.append(f"latent dtype: store has {store.dtype}, asked for {request.latent_dtype}")
    return diffs


def _open_existing(path: Path) -> LatentStore | None:
    """The store at `path`, or None when a run was killed while creating it (no units done)."""
    if not path.exists():
        return None
    if not is_store(path):
        if (path / "zarr.json").exists() or not any(path.iterdir()):
            return None  # half-created by a killed run: nothing finished, safe to recreate
        raise EmbedError(f"{path} exists and is not an alignpipe store; move it away or pass "
                         f"--overwrite to replace it")
    try:
        store = open_store(path, mode="r+")
        store.valid  # noqa: B018  (the last array created; missing means creation was cut)
        return store
    except (StoreError, KeyError):
        if not any((path / "units").glob("*.done")):
            return None
        raise


def embed_status(manifest: str | Path | Manifest, encoder: str, cache: str | Path = "cache", *,
                 dataset: str | None = None, column: str | None = None,
                 weights: str | Path | None = None, image_size: int | None = None,
                 pooling: str | None = None, latent_dtype: str = "float16") -> str:
    """``missing`` | ``partial`` | ``complete`` | ``conflict``, without loading any weights."""
    manifest = _manifest(manifest)
    request = make_request(encoder, column=column, weights=weights, image_size=image_size,
                           pooling=pooling, latent_dtype=latent_dtype)
    path = store_path(cache, dataset_name(dataset, manifest), encoder)
    if not path.exists():
        return "missing"
    try:
        store = _open_existing(path)
    except (EmbedError, StoreError):
        return "conflict"
    if store is None:
        return "partial"
    if _differences(store, request, manifest):
        return "conflict"
    return "complete" if store.complete else "partial"


def _resume_batch(store: LatentStore | None, batch_size: int | None) -> int | None:
    """The batch size a run on `store` must use: the one it was started with, when it has
    units left to do (None: choose one)."""
    if store is None:
        return batch_size
    started = store.encoder.get("request", {}).get("batch_size")
    if started is None or not store.pending_units():
        return batch_size  # made before batch sizes were recorded, or nothing left to run
    if batch_size is not None and batch_size != started:
        raise EmbedError(
            f"{store.path} was started with --batch-size {started}; resuming it with "
            f"--batch-size {batch_size} would give latents that differ slightly from an "
            f"uninterrupted run (kernels round differently per batch size). Leave out "
            f"--batch-size (or pass {started}) to resume, or pass --overwrite to start again")
    return int(started)


def _defaults(request: Request, batch_size: int | None, workers: int | None,
              device: str | None) -> tuple[int, int]:
    import torch

    # "auto" means the best device, as in resolve_device; not resolved here, since under
    # --scheduler this machine may have no GPU while the workers do.
    on_gpu = (str(device).startswith("cuda")
              or device in (None, "auto") and torch.cuda.is_available())
    batch = batch_size or (request.spec.batch_size if on_gpu
                           else min(request.spec.batch_size, CPU_BATCH_CAP))
    decoders = workers or max(1, min(32, os.cpu_count() or 1))
    if batch < 1 or decoders < 1:
        raise EmbedError("--batch-size and --workers must be at least 1")
    return batch, decoders


def embed(manifest: str | Path | Manifest, encoder: str, cache: str | Path = "cache", *,
          dataset: str | None = None, column: str | None = None,
          weights: str | Path | None = None, image_size: int | None = None,
          pooling: str | None = None, dtype: str | None = None, latent_dtype: str = "float16",
          batch_size: int | None = None, workers: int | None = None, unit_rows: int = 8192,
          device: str | None = None, cluster: str | None = None, scheduler: str | None = None,
          max_failure_rate: float = 0.01, overwrite: bool = False, progress: bool = True,
          decode_timeout: float | None = None, verify: bool = False) -> EmbedSummary:
    """Run every row of `manifest` through `encoder` once and fill its latent store.

    Finished work units are skipped, so an interrupted call resumes where it stopped; a unit
    whose files are gone or resized is redone, and with `verify` also one whose bytes no longer
    match the sha256 its marker recorded (every file is read). Raises
    FailureRateError (after the store is finished) when more than `max_failure_rate` of the
    rows failed.
    """
    from alignpipe.embed.runner import Job, remember_manifest, run_job

    began = time.perf_counter()
    manifest = _manifest(manifest)
    if manifest.rows == 0:
        raise EmbedError(f"{manifest.path}: the manifest has no rows")
    if cluster and scheduler:
        raise EmbedError("give --cluster or --scheduler, not both")
    if cluster:
        from alignpipe.embed.cluster import parse_cluster

        # N workers share this machine's cores: by default each gets its share of decoders.
        workers = workers or max(1, (os.cpu_count() or 1) // parse_cluster(cluster))
    if not 0 <= max_failure_rate <= 1:
        raise EmbedError(f"--max-failure-rate must be within 0..1, got {max_failure_rate}")
    if unit_rows < 1:
        raise EmbedError(f"--unit-rows must be at least 1, got {unit_rows}")
    request = make_request(encoder, column=column, weights=weights, image_size=image_size,
                           pooling=pooling, latent_dtype=latent_dtype)
    spec, _ = resolve_spec(request.spec, request.source, _modality_hint(column))
    read_column = column or spec.modality
    if not manifest.has(read_column):
        manifest.column(read_column)  # raises ManifestError naming the columns it does have
    check_column(read_column, spec.modality, encoder)
    path = store_path(cache, dataset_name(dataset, manifest), encoder).resolve()
    with lock_store(path):  # held until the store is finished: one writer per store
        store = _resolve_existing(path, request, manifest, overwrite)
        if verify and store is not None:
            store.forget_units(store.damaged_units(checksums=True))
        batch, decoders = _defaults(request, _resume_batch(store, batch_size), workers,
                                    device)
        job = Job(manifest=str(manifest.path.resolve()), manifest_sha256=manifest.sha256,
                  store=str(path.resolve()), encoder=encoder, column=read_column,
                  modality=spec.modality, weights=str(weights) if weights is not None else None,
                  image_size=image_size, pooling=pooling, device=device, dtype=dtype,
                  batch_size=batch, workers=decoders,
                  decode_timeout=decode_timeout or DECODE_TIMEOUT_S)
        remember_manifest(job, manifest)
        if (cluster or scheduler) and not (store is not None and store.complete):
            from alignpipe.embed.cluster import run_on_dask

            outcome = run_on_dask(job, request, store, unit_rows=unit_rows, cluster=cluster,
                                  scheduler=scheduler, progress=progress)
        else:  # a finished store needs no model load and no cluster
            outcome = run_job(job, request, store, unit_rows=unit_rows, progress=progress)
        summary = _summary(outcome, began, encoder)
    summary.extra = {"batch_size": batch, "workers": decoders, "cluster": cluster or scheduler}
    return _check_failure_rate(summary, max_failure_rate)


def _modality_hint(column: str | None) -> str | None:
    return column if column in MEDIA_COLUMNS else None


def _resolve_existing(path: Path, request: Request, manifest: Manifest,
                      overwrite: bool) -> LatentStore | None:
    """The store to resume, or None to create one (replacing whatever is there only once the
    encoder has loaded, so a failed load never costs the old store)."""
    if overwrite:
        return None
    store = _open_existing(path)
    if store is None:
        return None
    diffs = _differences(store, request, manifest)
    if diffs:
        raise EmbedError(f"{path} holds a store made differently ({'; '.join(diffs)}); pass "
                         f"--overwrite to replace it, or --dataset NAME to keep both")
    return store


def _summary(outcome: Outcome, began: float, encoder: str) -> EmbedSummary:
    store, stats = outcome.store, outcome.stats
    failures = store.merge_failures()
    valid = int(store.read_valid().sum())
    return EmbedSummary(
        path=store.path, rows=store.rows, valid=valid, failed=store.rows - valid,
        skipped_units=outcome.skipped, units=store.n_units,
        rows_per_s=stats.rows / outcome.seconds if outcome.seconds > 0 and stats.rows else 0.0,
        wall_s=time.perf_counter() - began, embedded_rows=stats.rows,
        encoded_items=stats.encoded, failures_path=failures, encoder=encoder)


def _check_failure_rate(summary: EmbedSummary, max_failure_rate: float) -> EmbedSummary:
    if summary.rows and summary.failed / summary.rows > max_failure_rate:
        raise FailureRateError(
            f"{summary.failed} of {summary.rows} rows failed "
            f"({summary.failed / summary.rows:.2%}), more than --max-failure-rate "
            f"{max_failure_rate:.2%}; the store is complete with those rows marked invalid, and "
            f"{summary.failures_path} says why each failed", summary)
    return summary
