"""Top-k search of a cached store through an aligned model's head: exact in chunks, or an
approximate index (model/index.py) for larger stores.

The store's latents are read a chunk of rows at a time, mapped through the head of the side
the store's encoder is, scored against the queries and merged into a running top-k, so memory
stays one chunk whatever the store's size. Rows that share a media file (COCO's five captions per
image) hold one latent and are one result, named by their first row. The approximate index
holds the same rows, so both searches answer in the same `Hit`s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignpipe.data.manifest import Manifest
from alignpipe.data.pairing import (
    ENCODER_IDENTITY,
    ManifestArg,
    as_store,
    check_encoder,
    first_rows,
    media_items,
    read_rows,
    store_manifest,
    usable,
)
from alignpipe.data.store import LatentStore
from alignpipe.methods.space import Encoded, num_rows, pairwise_scores
from alignpipe.model.aligned import AlignedModel
from alignpipe.util.constants import FILE_COLUMNS
from alignpipe.util.errors import AlignpipeError

SEARCH_CHUNK_ROWS = 65536
# `index="auto"` searches the approximate index above this many store rows, exactly below.
AUTO_INDEX_ROWS = 1_000_000


@dataclass
class Hit:
    rank: int
    row: int
    id: str
    score: float
    media: str | None = None   # absolute path of the row's image/audio file
    text: str | None = None
    label: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_store_for(model: AlignedModel, store: LatentStore) -> str:
    """The model side whose encoder made `store`'s latents; refuses a store of another one."""
    if store.modality not in model.modalities:
        raise AlignpipeError(f"{store.path} holds {store.modality} latents; this model reads "
                             f"{' and '.join(model.modalities)}")
    side = model.side(store.modality)
    expected = {k: side.encoder_attrs[k] for k in ENCODER_IDENTITY
                if side.encoder_attrs.get(k) is not None}
    check_encoder(store, expected, f"{store.modality} ({side.name})")
    return store.modality


def _cell(manifest: Manifest, column: str, row: int) -> str | None:
    if not manifest.has(column):
        return None
    value = manifest.column(column)[row]
    return None if value in (None, "") else str(value)


def searchable_rows(store: LatentStore, manifest: Manifest, modality: str) -> np.ndarray:
    """Rows a search can return: usable (valid, in a finished unit), the first of each media
    item."""
    rows = np.flatnonzero(usable(store))
    if modality in FILE_COLUMNS and manifest.has(modality):
        rows = rows[first_rows(media_items(manifest, modality, rows))]
    return rows


def _exact(model: AlignedModel, store: LatentStore, modality: str, rows: np.ndarray,
           query: Encoded, k: int, chunk_rows: int) -> list[tuple[list[int], list[float]]]:
    """(rows, scores) per query: every row scored, a chunk at a time, into a running top-k."""
    n = num_rows(query)
    best_scores = torch.full((n, 0), float("-inf"))
    best_rows = torch.zeros((n, 0), dtype=torch.long)
    for start in range(0, rows.size, chunk_rows):
        chunk = rows[start:start + chunk_rows]
        encoded = model.encode_latents(modality, read_rows(store, chunk, np.float32))
        scores = pairwise_scores(query, encoded).float().cpu()
        merged = torch.cat([best_scores, scores], dim=1)
        merged_rows = torch.cat([best_rows, torch.from_numpy(chunk).long().expand(n, -1)], dim=1)
        top = merged.topk(min(k, merged.shape[1]), dim=1)
        best_scores, best_rows = top.values, merged_rows.gather(1, top.indices)
    return [(best_rows[q].tolist(), best_scores[q].tolist()) for q in range(n)]


def _use_index(index: bool | str, store: LatentStore, query: Encoded) -> bool:
    """Whether to search the approximate index: `index` True, False or ``"auto"`` (above
    `AUTO_INDEX_ROWS` rows when usearch is installed and the encodings are dense)."""
    from alignpipe.model.index import IndexUnavailable, available

    if index not in (True, False, "auto"):
        raise AlignpipeError(f"index must be True, False or 'auto', got {index!r}")
    dense = isinstance(query, torch.Tensor)
    if index == "auto":
        return dense and store.rows > AUTO_INDEX_ROWS and available()
    if index and not dense:
        raise IndexUnavailable("the approximate index needs dense embeddings; this "
                                   "model's (asif) are sparse: search without --index")
    return bool(index)


def _hits(manifest: Manifest, modality: str,
          ranked: list[tuple[list[int], list[float]]]) -> list[list[Hit]]:
    ids = manifest.column("id")
    out = []
    for rows, scores in ranked:
        hits = []
        for rank, (row, score) in enumerate(zip(rows, scores, strict=True), 1):
            media = _cell(manifest, modality, row) if modality in FILE_COLUMNS else None
            if media is not None:
                media = str((manifest.root / media).resolve()) if "::" not in media and not \
                    Path(media).is_absolute() else media
            hits.append(Hit(rank, int(row), str(ids[row]), float(score), media,
                            _cell(manifest, "text", row), _cell(manifest, "label", row)))
        out.append(hits)
    return out


def search_encoded(model: AlignedModel, store: str | Path | LatentStore, query: Encoded, *,
                   k: int = 10, index: bool | str = False, chunk_rows: int = SEARCH_CHUNK_ROWS,
                   manifest: ManifestArg = None, progress: bool = False) -> list[list[Hit]]:
    """The top-`k` rows of `store` for queries already in the shared space (rows of
    `model.encode`), best first. `index`: False (exact), True (the approximate index, built
    and cached beside the store on first use) or ``"auto"``."""
    store = as_store(store)
    store.require_intact()
    modality = check_store_for(model, store)
    if k < 1:
        raise AlignpipeError(f"--k must be at least 1, got {k}")
    manifest = store_manifest(store, manifest)
    if _use_index(index, store, query):
        from alignpipe.model.index import store_index

        vectors = query.float().cpu().numpy()
        saved = store_index(model, store, modality, vectors.shape[1],
                            lambda: searchable_rows(store, manifest, modality),
                            chunk_rows=chunk_rows, progress=progress)
        return _hits(manifest, modality, saved.search(vectors, k))
    rows = searchable_rows(store, manifest, modality)
    return _hits(manifest, modality, _exact(model, store, modality, rows, query, k, chunk_rows))


def search_store(model: AlignedModel, store: str | Path | LatentStore, queries: Any, *,
                 query_modality: str = "text", k: int = 10, index: bool | str = False,
                 chunk_rows: int = SEARCH_CHUNK_ROWS, manifest: ManifestArg = None,
                 progress: bool = False) -> list[list[Hit]]:
    """The top-`k` rows of `store` for each query (raw inputs of `query_modality`), best
    first: exact cosine search in the shared space, or the approximate index (`index`, see
    `search_encoded`)."""
    return search_encoded(model, store, model.encode(query_modality, queries), k=k,
                          index=index, chunk_rows=chunk_rows, manifest=manifest,
                          progress=progress)
