"""Stage two's view of the stores: which rows pair up, which media items they show, on a device.

Shared by fit, evaluate and similarity, so all three refuse the same mistakes with the same
words: stores of different manifests, the same modality twice, latents of another encoder, a
damaged or unfinished store, a manifest that is gone or changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from alignpipe.data.manifest import FILE_COLUMNS, Manifest, read_manifest
from alignpipe.data.pairs import Pairs
from alignpipe.data.store import LatentStore, open_store
from alignpipe.util.devices import resolve_device  # noqa: F401  (re-exported for stage two)
from alignpipe.util.errors import StoreError

if TYPE_CHECKING:
    import numpy.typing as npt

# Encoder attrs that say which function made the latents (provenance like an import's source
# file is left out: the prompts of a zero-shot eval are imported from another file).
ENCODER_IDENTITY = ("name", "backend", "model_id", "revision", "weights_sha256", "pooling", "dim")
# Rows are read a block of whole chunks at a time (about this many bytes in the stored dtype), so
# reading most of a large store never holds more than the selected rows plus one block.
READ_BLOCK_BYTES = 32 << 20
# What `--manifest` accepts: one manifest or several (zero-shot's query and prompts manifests).
ManifestArg = str | Path | Manifest | Sequence[str | Path | Manifest] | None


def as_store(store: str | Path | LatentStore) -> LatentStore:
    return store if isinstance(store, LatentStore) else open_store(store)


# ---- opening stores for stage two ---------------------------------------------------------------
def manifest_locations(store: LatentStore) -> list[Path]:
    """Where a store's manifest may be (see `LatentStore.manifest_locations`)."""
    return store.manifest_locations()


def _built_from(store: LatentStore) -> str:
    info = store.manifest_info
    return (f"{store.path} was built from manifest {info.get('path')} (sha256 "
            f"{str(info.get('sha256'))[:12]}…, {info.get('rows')} rows)")


def _locate_manifest(store: LatentStore) -> Manifest:
    changed = []
    for path in manifest_locations(store):
        if path.is_file():
            manifest = read_manifest(path)
            if manifest.sha256 == store.manifest_info.get("sha256"):
                return manifest
            changed.append(f"{path} has sha256 {manifest.sha256[:12]}… ({manifest.rows} rows)")
    if changed:
        raise StoreError(f"{_built_from(store)}, but {'; '.join(changed)}: the manifest changed "
                         f"since, and row i of a store must be row i of its manifest; re-embed, "
                         f"or pass the original manifest with --manifest PATH")
    raise StoreError(f"{_built_from(store)}, which is not there any more (looked at "
                     f"{', '.join(map(str, manifest_locations(store))) or 'nothing recorded'}); "
                     f"stage two needs it for splits and media paths: pass --manifest PATH to "
                     f"say where it is now")


def _given_manifests(manifest: ManifestArg) -> list[Manifest]:
    if manifest is None:
        return []
    items = [manifest] if isinstance(manifest, (str, Path, Manifest)) else list(manifest)
    return [m if isinstance(m, Manifest) else read_manifest(m) for m in items]


def store_manifests(stores: list[LatentStore], manifest: ManifestArg = None) -> list[Manifest]:
    """The manifest each store was built from, checked against the sha256 the store recorded.

    `manifest` (``--manifest``, once or more) names where manifests are now; each must be the
    manifest of one of the stores. A store no given manifest matches finds its own: relative to
    the store first, then at its recorded path.
    """
    by_sha = {m.sha256: m for m in _given_manifests(manifest)}
    wanted = {s.manifest_info.get("sha256") for s in stores}
    for sha, given in by_sha.items():
        if sha not in wanted:
            raise StoreError(
                f"--manifest {given.path} (sha256 {sha[:12]}…, {given.rows} rows) is not the "
                f"manifest of any store given: {'; '.join(_built_from(s) for s in stores)}")
    out = []
    for store in stores:
        sha = store.manifest_info.get("sha256")
        if sha not in by_sha:
            by_sha[sha] = _locate_manifest(store)
        out.append(by_sha[sha])
    return out


def store_manifest(store: LatentStore, manifest: ManifestArg = None) -> Manifest:
    """The manifest a store was built from (see `store_manifests`)."""
    return store_manifests([store], manifest)[0]


def stage_two_store(store: str | Path | LatentStore, *, allow_partial: bool = False) -> LatentStore:
    """Open a store for fit, eval or similarity: refuse a damaged store, and an unfinished one
    (its missing rows would silently shrink the data) unless `allow_partial`."""
    store = as_store(store)
    store.require_intact()
    if not store.complete and not allow_partial:
        raise StoreError(
            f"{store.path}: the store is unfinished ({len(store.done_units())} of "
            f"{store.n_units} work units embedded); finish it with `{store.repair_command()}`, "
            f"or pass --allow-partial to use only the rows embedded so far")
    return store


def partial_note(store: LatentStore) -> str | None:
    """A line saying how much of an unfinished store is used (None when it is finished)."""
    if store.complete:
        return None
    return (f"{store.path} is unfinished ({len(store.done_units())} of {store.n_units} work "
            f"units embedded, {int(usable(store).sum())} of {store.rows} rows valid in them); "
            f"--allow-partial: using only those rows")


def partial_notes(stores: list[LatentStore]) -> list[str]:
    return [note for note in map(partial_note, stores) if note]


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


def open_pair(store_a: str | Path | LatentStore, store_b: str | Path | LatentStore, *,
              manifest: ManifestArg = None,
              allow_partial: bool = False) -> tuple[LatentStore, LatentStore, Manifest]:
    """Open two stores to align and refuse pairs that cannot be aligned row by row."""
    a, b = (stage_two_store(s, allow_partial=allow_partial) for s in (store_a, store_b))
    check_same_manifest([a, b])
    if a.modality == b.modality:
        raise StoreError(
            f"{a.path} and {b.path} both hold {a.modality} latents; alignment pairs two "
            f"different modalities (image–text, audio–text, image–audio)")
    return a, b, store_manifests([a, b], manifest)[0]


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


def usable(store: LatentStore) -> np.ndarray:
    """Per row: valid and in a finished work unit (an unfinished unit may be half written)."""
    valid = store.read_valid()
    if not store.complete:
        finished = np.zeros(store.rows, dtype=bool)
        for unit in store.done_units():
            start, stop = store.unit_range(unit)
            finished[start:stop] = True
        valid &= finished
    return valid


def valid_rows(stores: list[LatentStore], rows: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The rows valid in every store, and how many each store invalidated."""
    keep = np.ones(rows.size, dtype=bool)
    lost = []
    for store in stores:
        ok = usable(store)[rows]
        lost.append(int((~ok).sum()))
        keep &= ok
    return rows[keep], lost


def first_rows(items: np.ndarray) -> np.ndarray:
    """Index of the first row of each item, in item order (items are numbered 0..n-1)."""
    return np.unique(items, return_index=True)[1]


def media_items(manifest: Manifest, modality: str, rows: np.ndarray) -> np.ndarray:
    """Item number per row: rows with the same media path are one item (captions are not)."""
    if modality not in FILE_COLUMNS or not manifest.has(modality):
        return np.arange(rows.size)
    values = manifest.column(modality)
    first: dict[str, int] = {}
    out = np.empty(rows.size, dtype=np.int64)
    for j, row in enumerate(rows):
        key = values[row]
        out[j] = first.setdefault(key if key not in (None, "") else f"\0row{row}", len(first))
    return out


def _read_blocks(store: LatentStore,
                 rows: np.ndarray) -> Iterator[tuple[slice | np.ndarray, np.ndarray]]:
    """(positions in `rows`, their latents in the stored dtype), one block of chunks at a time.

    A block is read whole when a third or more of its rows are wanted (a sliced read is faster
    than a gather), else only the chunks holding wanted rows are read. Positions are a slice
    when `rows` is sorted (the usual case), so no per-row index is built.
    """
    ordered = bool(np.all(rows[1:] >= rows[:-1]))
    order = None if ordered else np.argsort(rows, kind="stable")
    wanted = rows if ordered else rows[order]
    chunk = int(store.latents.chunks[0])
    row_bytes = store.dim * np.dtype(store.dtype).itemsize
    block = max(1, READ_BLOCK_BYTES // (row_bytes * chunk)) * chunk
    cuts = np.searchsorted(wanted, np.arange(0, store.rows + block, block))
    for first, (i, j) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        if i == j:
            continue
        start, stop = first * block, min((first + 1) * block, store.rows)
        take = wanted[i:j]
        with store.reading():  # a chunk failing its checksum names the damaged units
            if 3 * take.size >= stop - start:
                data = store.latents[start:stop][take - start]
            else:
                data = store.latents.get_orthogonal_selection((take, slice(None)))
        yield (slice(int(i), int(j)) if ordered else order[i:j]), np.asarray(data)


def _checked_rows(store: LatentStore, rows: npt.ArrayLike) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= store.rows):
        raise IndexError(f"{store.path}: rows out of range 0..{store.rows - 1}")
    return rows


def read_rows(store: LatentStore, rows: npt.ArrayLike,
              dtype: str | np.dtype | None = None) -> np.ndarray:
    """Latents of `rows`, in order, as `dtype` (default: the stored dtype).

    Read a block of chunks at a time straight into the result: host memory stays about the
    selected rows, never the whole store in float32.
    """
    rows = _checked_rows(store, rows)
    out = np.empty((rows.size, store.dim), dtype=dtype or store.dtype)
    for positions, data in _read_blocks(store, rows):
        out[positions] = data
    return out


def load_rows(store: LatentStore, rows: npt.ArrayLike, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """Latents of `rows`, in order, as a `dtype` tensor on `device`, filled block by block (on
    an accelerator the host holds one block at a time, not the selection)."""
    rows = _checked_rows(store, rows)
    out = torch.empty((rows.size, store.dim), dtype=dtype, device=device)
    for positions, data in _read_blocks(store, rows):
        block = torch.from_numpy(data).to(device=device, dtype=dtype)
        if isinstance(positions, slice):
            out[positions] = block
        else:
            out[torch.from_numpy(positions).to(device)] = block
    return out


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
    pairs = Pairs(a=load_rows(a, kept, device, dtype), b=load_rows(b, kept, device, dtype),
                  rows=kept,
                  items_a=media_items(manifest, a.modality, kept),
                  items_b=media_items(manifest, b.modality, kept))
    return pairs, lost
