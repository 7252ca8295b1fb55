"""Stage two's view of the stores: which rows pair up, which media items they show, on a device.

Shared by fit, evaluate and similarity, so all three refuse the same mistakes with the same
words: stores of different manifests, the same modality twice, latents of another encoder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from alignpipe.errors import StoreError
from alignpipe.manifest import PATH_COLUMNS, Manifest, read_manifest
from alignpipe.methods.base import Pairs
from alignpipe.store import LatentStore, open_store

# Encoder attrs that say which function made the latents (provenance like an import's source
# file is left out: the prompts of a zero-shot eval are imported from another file).
ENCODER_IDENTITY = ("name", "backend", "model_id", "revision", "weights_sha256", "pooling", "dim")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device not in (None, "", "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def as_store(store: str | Path | LatentStore) -> LatentStore:
    return store if isinstance(store, LatentStore) else open_store(store)


def store_manifest(store: LatentStore) -> Manifest:
    """The manifest a store was built from, checked against the sha256 the store recorded."""
    path = store.manifest_info.get("path")
    if not path or not Path(path).exists():
        raise StoreError(f"{store.path}: the store was built from manifest {path}, which is not "
                         f"there any more; stage two needs it for splits and media paths")
    manifest = read_manifest(path)
    store.check_manifest(manifest)
    return manifest


def check_same_manifest(stores: list[LatentStore]) -> None:
    first = stores[0]
    for other in stores[1:]:
        if other.manifest_info.get("sha256") != first.manifest_info.get("sha256"):
            raise StoreError(
                f"{first.path} and {other.path} were built from different manifests "
                f"({first.manifest_info.get('path')}, sha256 "
                f"{str(first.manifest_info.get('sha256'))[:12]}… vs "
                f"{other.manifest_info.get('path')}, sha256 "
                f"{str(other.manifest_info.get('sha256'))[:12]}…); row i must be the same item "
                f"in every store, so give stores embedded from one manifest")


def open_pair(store_a, store_b) -> tuple[LatentStore, LatentStore, Manifest]:
    """Open two stores to align and refuse pairs that cannot be aligned row by row."""
    a, b = as_store(store_a), as_store(store_b)
    check_same_manifest([a, b])
    if a.modality == b.modality:
        raise StoreError(
            f"{a.path} and {b.path} both hold {a.modality} latents; alignment pairs two "
            f"different modalities (image–text, audio–text, image–audio)")
    return a, b, store_manifest(a)


def encoder_identity(store: LatentStore) -> dict:
    encoder = store.encoder
    return {k: encoder[k] for k in ENCODER_IDENTITY if encoder.get(k) is not None}


def check_encoder(store: LatentStore, expected: dict, role: str) -> None:
    """Refuse latents of another encoder than the one a run was fitted on."""
    found = encoder_identity(store)
    diff = [f"{k}: {found.get(k)!r} here, {expected.get(k)!r} in the run"
            for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diff:
        raise StoreError(f"{store.path}: its latents come from another encoder than the run's "
                         f"{role} side ({'; '.join(diff)})")


# ---- rows ---------------------------------------------------------------------------------------
def hash_fraction(ids: list[str]) -> np.ndarray:
    """A stable number in [0, 1) per id, independent of row order and of the machine."""
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(),
                                    "big") / 2.0 ** 64 for i in ids])


def split_rows(manifest: Manifest, split: str) -> np.ndarray:
    """Rows of `split`; every row when the manifest has no split column."""
    return np.asarray(manifest.split_rows(split), dtype=np.int64)


def train_val_rows(manifest: Manifest, val_fraction: float) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and validation rows, and a sentence saying how validation was chosen."""
    train = split_rows(manifest, "train")
    if manifest.has("split"):
        val = split_rows(manifest, "val")
        if val.size:
            return train, val, f"validation: the manifest's val split ({val.size} rows)"
        how = "the manifest has no val rows"
    else:
        how = "the manifest has no split column (so no test split either)"
    ids = np.asarray(manifest.ids, dtype=object)[train]
    held = hash_fraction(list(ids)) < val_fraction
    return (train[~held], train[held],
            f"validation: {how}; holding out {int(held.sum())} rows ({val_fraction:.0%} by "
            f"hash of id)")


def valid_rows(stores: list[LatentStore], rows: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The rows valid in every store, and how many each store invalidated."""
    keep = np.ones(rows.size, dtype=bool)
    lost = []
    for store in stores:
        ok = store.read_valid()[rows]
        lost.append(int((~ok).sum()))
        keep &= ok
    return rows[keep], lost


def first_rows(items: np.ndarray) -> np.ndarray:
    """Index of the first row of each item, in item order (items are numbered 0..n-1)."""
    return np.unique(items, return_index=True)[1]


def media_items(manifest: Manifest, modality: str, rows: np.ndarray) -> np.ndarray:
    """Item number per row: rows with the same media path are one item (captions are not)."""
    if modality not in PATH_COLUMNS or not manifest.has(modality):
        return np.arange(rows.size)
    values = manifest.column(modality)
    first: dict[str, int] = {}
    out = np.empty(rows.size, dtype=np.int64)
    for j, row in enumerate(rows):
        key = values[row]
        out[j] = first.setdefault(key if key not in (None, "") else f"\0row{row}", len(first))
    return out


def read_rows(store: LatentStore, rows: np.ndarray) -> np.ndarray:
    """Latents of `rows` as float32; a full read when most rows are wanted (it is faster)."""
    if rows.size > store.rows // 3:
        return store.read(slice(None))[rows]
    return store.read(np.sort(rows))[np.argsort(np.argsort(rows))]


def storage_dtype(device: torch.device, wanted: str = "auto") -> torch.dtype:
    if wanted != "auto":
        return getattr(torch, wanted)
    # Accelerators hold the latents as fp16 (what the stores keep: lossless and half the
    # memory); CPU matmuls in fp16 are slow, so the CPU keeps fp32.
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Always a torch-owned copy: on CPU, multi-threaded row gathers from numpy-owned memory
    # measured ~300× slower than from torch's own allocations.
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype,
                                                            copy=True)


def load_pairs(a: LatentStore, b: LatentStore, manifest: Manifest, rows: np.ndarray,
               device: torch.device, dtype: torch.dtype) -> tuple[Pairs, list[int]]:
    """Rows valid in both stores, as device tensors; also the invalid counts per store."""
    kept, lost = valid_rows([a, b], rows)
    pairs = Pairs(a=to_device(read_rows(a, kept), device, dtype),
                  b=to_device(read_rows(b, kept), device, dtype), rows=kept,
                  items_a=media_items(manifest, a.modality, kept),
                  items_b=media_items(manifest, b.modality, kept))
    return pairs, lost
