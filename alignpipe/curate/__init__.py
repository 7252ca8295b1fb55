"""Curation: choose the rows of a pool manifest that fit a target concept set, on cached latents.

``curate(pool_store, [concept_store, ...], per_concept=50_000)`` scores every valid pool row
against every concept (the mean normalised latent of each class of a concept store, embedded with
the pool's encoder), keeps a running top-N per concept while reading the pool shard by shard
(memory concepts × N; on the GPU when there is one), takes the union (each row once, with its
best concept and score), optionally caps rows per concept (`balance`) and drops near-duplicates
on another store of the pool (image latents), and returns a `Selection`. `write_selection`
writes it as parquet, atomically; `alignpipe fit --select` trains on it.

Each pool shard is one task: run in this process, or as dask tasks over a cluster with a tree
reduction of the per-shard results (`cluster=` / `scheduler=`, as `embed`), which gives the
same selection. With `parts=FOLDER` every shard's result is saved there as it finishes, and a
rerun with the same spec skips the shards already done.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignpipe.curate.concepts import Concepts, check_same_encoder, load_concepts
from alignpipe.curate.selection import (
    Selection,
    SelectionError,
    check_selection,
    read_selection,
    selection_record,
    write_selection,
)
from alignpipe.curate.topk import TopN, balance, merge, near_duplicates, range_topn, union
from alignpipe.data.pairing import check_same_manifest, read_rows, stage_two_store
from alignpipe.data.store import LatentStore, open_store
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import torch
    from distributed import Client

    from alignpipe.data.manifest import Manifest
    from alignpipe.data.pairing import ManifestArg

    StoreLike = str | Path | LatentStore
    DeviceArg = torch.device | str | None

__all__ = ["Concepts", "CurateSpec", "Selection", "SelectionError", "check_selection",
           "random_selection", "train_rows_of",
           "column_at", "curate", "load_concepts", "read_selection", "selection_record",
           "write_selection"]

DEFAULT_PER_CONCEPT = 50_000  # freeze-align's top-k per concept
DEFAULT_DEDUPE = 0.95


@dataclass
class CurateSpec:
    """Everything that decides a selection (its hash names the per-shard partial results)."""

    pool: str
    concepts: list[str]
    per_concept: int = DEFAULT_PER_CONCEPT
    threshold: float | None = None
    balance: int | None = None
    dedupe_store: str | None = None
    dedupe_threshold: float = DEFAULT_DEDUPE

    def check(self) -> None:
        if self.per_concept <= 0:
            raise AlignpipeError(f"--per-concept must be at least 1, got {self.per_concept}")
        if self.balance is not None and self.balance <= 0:
            raise AlignpipeError(f"--balance must be at least 1, got {self.balance}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise AlignpipeError(f"--threshold is a cosine in [-1, 1], got {self.threshold}")
        if not 0.0 < self.dedupe_threshold <= 1.0:
            raise AlignpipeError(f"--dedupe-threshold is a cosine in (0, 1], got "
                                 f"{self.dedupe_threshold}")

    def rule(self) -> str:
        rule = f"top{self.per_concept}"
        if self.threshold is not None:
            rule += f">={self.threshold:g}"
        if self.balance is not None:
            rule += f",cap{self.balance}"
        return rule


@dataclass
class ShardJob:
    """What one shard task needs (plain data: it travels to dask workers)."""

    pool: str
    others: list[str]
    vectors: np.ndarray
    per_concept: int
    threshold: float | None
    device: str | None
    parts: str | None = None

    def run(self, unit: int, stores: list[LatentStore] | None = None) -> TopN:
        """One shard's top-N; `stores` (pool first, then the others) saves reopening them."""
        if self.parts:
            done = _read_part(Path(self.parts), unit)
            if done is not None:
                return done
        from alignpipe.util.devices import resolve_device

        pool, *others = stores or [open_store(p) for p in (self.pool, *self.others)]
        start, stop = pool.unit_range(unit)
        valid = np.asarray(pool.valid[start:stop], dtype=bool)
        for other in others:
            valid &= np.asarray(other.valid[start:stop], dtype=bool)
        valid = np.asarray(valid, dtype=bool)
        part = range_topn(pool, start, stop, self.vectors, np.asarray(valid, dtype=bool),
                          self.per_concept, self.threshold, resolve_device(self.device))
        if self.parts:
            _write_part(Path(self.parts), unit, part)
        return part


@dataclass
class Curation:
    """A selection and what a report needs about it."""

    selection: Selection
    concepts: Concepts
    per_concept: np.ndarray           # rows kept per concept
    pool_scores: np.ndarray           # a sample of best-concept scores of all pool rows
    shards_skipped: int = 0
    removed: dict = field(default_factory=dict)


# ---- partial results ------------------------------------------------------------------------
def _part_path(parts: Path, unit: int) -> Path:
    return parts / f"{unit:05d}.npz"


def _read_part(parts: Path, unit: int) -> TopN | None:
    path = _part_path(parts, unit)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return TopN(data["scores"], data["rows"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged partial is redone


def _write_part(parts: Path, unit: int, part: TopN) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, scores=part.scores, rows=part.rows)
    atomic_write_bytes(_part_path(parts, unit), buffer.getvalue())


def prepare_parts(parts: Path, spec: dict) -> None:
    """Use `parts` for this spec's shard results; results of another spec are removed."""
    marker = parts / "spec.json"
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()) == spec
        except ValueError:
            same = False
        if not same:
            for old in parts.glob("*.npz"):
                old.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, spec)


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ---- the job --------------------------------------------------------------------------------
def _open_inputs(spec: CurateSpec, manifest: ManifestArg = None
                 ) -> tuple[LatentStore, LatentStore | None, Concepts]:
    """Open and check every input before any scoring (each mistake one line naming the file)."""
    spec.check()
    pool = stage_two_store(spec.pool)
    dedupe = None
    if spec.dedupe_store is not None:
        dedupe = stage_two_store(spec.dedupe_store)
        check_same_manifest([pool, dedupe])
    concepts = load_concepts(spec.concepts, pool, manifest)
    return pool, dedupe, concepts


def curate(pool: StoreLike, concepts: StoreLike | Iterable[StoreLike], *,
           per_concept: int = DEFAULT_PER_CONCEPT, threshold: float | None = None,
           balance_cap: int | None = None, dedupe_store: StoreLike | None = None,
           dedupe_threshold: float = DEFAULT_DEDUPE, device: DeviceArg = None,
           parts: str | Path | None = None, cluster: str | None = None,
           scheduler: str | None = None, client: Client | None = None,
           manifest: ManifestArg = None,
           on_shard: Callable[[int], None] | None = None,
           on_start: Callable[[int, int], None] | None = None) -> Curation:
    """Select pool rows for the concepts of `concepts` (see the module docstring).

    `on_start(shards, skipped)` and `on_shard(rows)` let a caller draw progress; `client` is
    a connected dask Client to run the shard tasks on (instead of `cluster` / `scheduler`).
    """
    concepts = [concepts] if isinstance(concepts, (str, Path, LatentStore)) else list(concepts)
    spec = CurateSpec(pool=str(_path(pool)), concepts=[str(_path(c)) for c in concepts],
                      per_concept=int(per_concept), threshold=threshold, balance=balance_cap,
                      dedupe_store=None if dedupe_store is None else str(_path(dedupe_store)),
                      dedupe_threshold=dedupe_threshold)
    pool_store, dedupe, found = _open_inputs(spec, manifest)
    from alignpipe.data.pairing import store_manifest

    pool_manifest = store_manifest(pool_store, manifest)
    job = ShardJob(pool=str(pool_store.path), others=[str(dedupe.path)] if dedupe else [],
                   vectors=found.vectors, per_concept=spec.per_concept,
                   threshold=spec.threshold, device=None if device is None else str(device))
    identity = {**asdict(spec), "pool_sha256": pool_manifest.sha256,
                "concept_vectors": hashlib.sha256(found.vectors.tobytes()).hexdigest()}
    units = list(range(pool_store.n_units))
    skipped = 0
    if parts is not None:
        parts = Path(parts)
        prepare_parts(parts, identity)
        job.parts = str(parts)
        skipped = sum(_part_path(parts, u).is_file() for u in units)
    if on_start:
        on_start(len(units), skipped)
    if cluster or scheduler or client is not None:
        from alignpipe.curate.cluster import run_on_dask

        top = run_on_dask(job, units, cluster=cluster, scheduler=scheduler, on_shard=on_shard,
                          store=pool_store, client=client)
    else:
        top = TopN.empty(len(found))
        opened = [pool_store, *([dedupe] if dedupe else [])]
        for unit in units:
            top = merge(top, job.run(unit, opened), spec.per_concept)
            if on_shard:
                start, stop = pool_store.unit_range(unit)
                on_shard(stop - start)
    return _finish(spec, top, found, pool_store, pool_manifest, dedupe, device, skipped)


def column_at(manifest: Manifest, name: str, rows: np.ndarray) -> list:
    """Cells of `rows` only (a 400M-row pool's whole id column would not fit as Python str)."""
    import pyarrow as pa

    return manifest.table.column(name).take(pa.array(np.asarray(rows, dtype=np.int64))
                                            ).to_pylist()


def _path(store: StoreLike) -> Path:
    return store.path if isinstance(store, LatentStore) else Path(store)


def _finish(spec: CurateSpec, top: TopN, found: Concepts, pool: LatentStore,
            manifest: Manifest, dedupe: LatentStore | None, device: DeviceArg,
            skipped: int) -> Curation:
    from alignpipe.util.devices import resolve_device

    rows, concept, scores = union(top)
    removed = {"union_overlap": int((top.rows >= 0).sum() - rows.size)}
    rules = np.full(rows.size, spec.rule(), dtype=object)
    if spec.balance is not None:
        keep = balance(rows, concept, scores, spec.balance)
        removed["balance"] = int((~keep).sum())
        rows, concept, scores, rules = rows[keep], concept[keep], scores[keep], rules[keep]
    if dedupe is not None and rows.size:
        keep = near_duplicates(read_rows(dedupe, rows, np.float32), scores, rows,
                               spec.dedupe_threshold, resolve_device(device))
        removed["near_duplicates"] = int((~keep).sum())
        rows, concept, scores, rules = rows[keep], concept[keep], scores[keep], rules[keep]
        rules = np.array([f"{r},dedupe<{spec.dedupe_threshold:g}" for r in rules], dtype=object)
    ids = column_at(manifest, "id", rows)
    meta = {"pool": {"store": str(pool.path), "manifest_path": str(manifest.path),
                     "manifest_sha256": manifest.sha256, "rows": manifest.rows},
            "spec": asdict(spec), "concepts": found.sources, "removed": removed,
            "encoder": pool.encoder.get("name")}
    selection = Selection(rows=rows.astype(np.int64), ids=ids,
                          concepts=[found.names[c] for c in concept.tolist()],
                          scores=scores.astype(np.float32), rules=list(rules), meta=meta)
    counts = np.bincount(concept, minlength=len(found))
    return Curation(selection, found, counts, _pool_score_sample(pool, found, device), skipped,
                    removed)


def _pool_score_sample(pool: LatentStore, found: Concepts, device: DeviceArg,
                       sample: int = 20_000) -> np.ndarray:
    """Best-concept scores of an evenly spaced sample of valid pool rows (for the report)."""
    import torch

    from alignpipe.util.devices import resolve_device

    valid = np.flatnonzero(pool.read_valid())
    if valid.size > sample:
        valid = valid[np.linspace(0, valid.size - 1, sample).astype(np.int64)]
    if valid.size == 0:
        return np.zeros(0, np.float32)
    dev = resolve_device(device)
    c = torch.from_numpy(found.vectors).to(dev)
    best = []
    for first in range(0, valid.size, 4096):  # memory: one block × concepts
        x = torch.from_numpy(read_rows(pool, valid[first:first + 4096], np.float32)).to(dev)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best.append((x @ c.T).max(dim=1).values.cpu().numpy())
    return np.concatenate(best)


def check_encoders(pool: LatentStore, concept_stores: Iterable[StoreLike]) -> None:
    """Refuse concept stores of another encoder than the pool's (before any work)."""
    for store in concept_stores:
        check_same_encoder(stage_two_store(store), pool, "concept")


def random_selection(pool: StoreLike, rows: int, *, seed: int = 0,
                     split: str | None = "train", manifest: ManifestArg = None) -> Selection:
    """`rows` pool rows drawn uniformly (seeded) among the valid rows of `split`: the baseline a
    curated selection of the same budget is compared with."""
    from alignpipe.data.pairing import split_rows, store_manifest, usable

    if rows <= 0:
        raise AlignpipeError(f"a random selection needs at least 1 row, got {rows}")
    store = stage_two_store(pool)
    found = store_manifest(store, manifest)
    candidates = split_rows(found, split) if split else np.arange(found.rows)
    candidates = candidates[usable(store)[candidates]]
    if candidates.size < rows:
        raise AlignpipeError(f"{store.path}: only {candidates.size} valid {split or ''} rows, "
                             f"fewer than the {rows} asked for")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, rows, replace=False))
    meta = {"pool": {"store": str(store.path), "manifest_path": str(found.path),
                     "manifest_sha256": found.sha256, "rows": found.rows},
            "spec": {"random": rows, "seed": seed, "split": split}}
    return Selection(chosen.astype(np.int64), column_at(found, "id", chosen),
                     ["random"] * rows, np.zeros(rows, np.float32), [f"random{seed}"] * rows,
                     meta)


def train_rows_of(selection: Selection, manifest: Manifest) -> int:
    """How many of a selection's rows are in the manifest's train split (what fit trains on)."""
    from alignpipe.data.pairing import split_rows

    return int(np.intersect1d(selection.rows, split_rows(manifest, "train")).size)
