"""Concepts: one unit vector per class of a concept store (the mean of its normalised latents).

A concept store is any store of a manifest with a ``class_id`` or ``label`` column: a prompts
manifest (class names × templates, embedded with the pool's text encoder) or a few labelled
images per class (image prototypes, in the pool's image encoder). Rows invalid in the store are
skipped; a class left with no valid row is no concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from alignpipe.data.pairing import (
    encoder_identity,
    read_rows,
    stage_two_store,
    store_manifest,
    usable,
)
from alignpipe.data.store import LatentStore
from alignpipe.util.errors import StoreError, format_rows

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from alignpipe.data.pairing import ManifestArg


@dataclass
class Concepts:
    """`names[i]` (class key, made unique across concept sets) has unit vector `vectors[i]`."""

    names: list[str]
    labels: list[str]
    vectors: np.ndarray  # concepts × dim, float32, unit norm
    sources: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def check_same_encoder(store: LatentStore, pool: LatentStore, role: str) -> None:
    """Refuse latents of another encoder than the pool store's (cosines would mean nothing)."""
    found, expected = encoder_identity(store), encoder_identity(pool)
    diff = [f"{k}: {found.get(k)!r} vs {expected.get(k)!r}"
            for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diff or store.dim != pool.dim:
        raise StoreError(f"{store.path}: this {role} store was embedded with another encoder than "
                         f"the pool store {pool.path} ({'; '.join(diff) or 'dim differs'}); "
                         f"embed the {role} manifest with the pool's encoder")


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def store_concepts(store: LatentStore, manifest: ManifestArg = None
                   ) -> tuple[list[str], list[str], np.ndarray]:
    """Class keys, display labels and unit mean vectors of one concept store."""
    manifest = store_manifest(store, manifest)
    key_column = "class_id" if manifest.has("class_id") else "label" if manifest.has("label") \
        else None
    if key_column is None:
        raise StoreError(f"{store.path}: its manifest {manifest.path} has no class_id or label "
                         f"column, so it names no concepts")
    keys = manifest.column(key_column)
    labels = manifest.column("label") if manifest.has("label") else keys
    ok = usable(store)
    rows = np.array([r for r in range(manifest.rows) if ok[r] and keys[r] not in (None, "")],
                    dtype=np.int64)
    if rows.size == 0:
        raise StoreError(f"{store.path}: no valid row with a {key_column}, so no concepts")
    latents = normalise(read_rows(store, rows, np.float32))
    names: list[str] = []
    index: dict[str, int] = {}
    for r in rows:
        index.setdefault(keys[r], len(index))
    names = list(index)
    which = np.array([index[keys[r]] for r in rows])
    sums = np.zeros((len(names), store.dim), dtype=np.float64)
    np.add.at(sums, which, latents)
    first_label = {}
    for r in rows:
        first_label.setdefault(keys[r], labels[r])
    return names, [str(first_label[n]) for n in names], normalise(sums)


def load_concepts(stores: Iterable[str | Path | LatentStore], pool: LatentStore,
                  manifest: ManifestArg = None) -> Concepts:
    """Concepts of every store in `stores`, each checked against the pool store's encoder.

    A key present in several concept sets is kept apart (``key@dataset``): freeze-align draws
    on 14 datasets, whose class names may coincide without meaning the same thing.
    """
    opened = [stage_two_store(s) for s in stores]
    if not opened:
        raise StoreError("curate needs at least one concept store (--concepts STORE)")
    for store in opened:
        check_same_encoder(store, pool, "concept")
    per_store = [store_concepts(s, manifest) for s in opened]
    counts: dict[str, int] = {}
    for names, _, _ in per_store:
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    names, labels, vectors, sources = [], [], [], []
    for store, (keys, labs, vecs) in zip(opened, per_store, strict=True):
        dataset = store.path.parent.name
        names += [k if counts[k] == 1 else f"{k}@{dataset}" for k in keys]
        labels += labs
        vectors.append(vecs)
        sources.append({"path": str(store.path), "manifest_sha256": store.manifest_info.get(
            "sha256"), "concepts": len(keys)})
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise StoreError(f"concept names repeat across concept stores: {format_rows(dup)}")
    return Concepts(names, labels, np.concatenate(vectors), sources)
