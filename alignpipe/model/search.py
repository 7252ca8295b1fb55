"""Exact top-k search of a cached store through an aligned model's head, in chunks.

The store's latents are read a chunk of rows at a time, mapped through the head of the side
the store's encoder is, scored against the queries and merged into a running top-k, so memory
stays one chunk whatever the store's size. Rows that share a media file (COCO's five captions per
image) hold one latent and are one result, named by their first row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from alignpipe.data.pairing import (
    ENCODER_IDENTITY,
    as_store,
    check_encoder,
    first_rows,
    media_items,
    read_rows,
    store_manifest,
    usable,
)
from alignpipe.data.store import LatentStore
from alignpipe.methods.space import num_rows, pairwise_scores
from alignpipe.model.aligned import AlignedModel
from alignpipe.util.constants import FILE_COLUMNS
from alignpipe.util.errors import AlignpipeError

SEARCH_CHUNK_ROWS = 65536


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


def _cell(manifest, column: str, row: int) -> str | None:
    if not manifest.has(column):
        return None
    value = manifest.column(column)[row]
    return None if value in (None, "") else str(value)


def search_store(model: AlignedModel, store: str | Path | LatentStore, queries, *,
                 query_modality: str = "text", k: int = 10,
                 chunk_rows: int = SEARCH_CHUNK_ROWS, manifest=None) -> list[list[Hit]]:
    """The top-`k` rows of `store` for each query (raw inputs of `query_modality`), best
    first: exact cosine search in the shared space."""
    store = as_store(store)
    store.require_intact()
    modality = check_store_for(model, store)
    if k < 1:
        raise AlignpipeError(f"--k must be at least 1, got {k}")
    manifest = store_manifest(store, manifest)
    query = model.encode(query_modality, queries)
    rows = np.flatnonzero(usable(store))
    if modality in FILE_COLUMNS and manifest.has(modality):
        rows = rows[first_rows(media_items(manifest, modality, rows))]
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
    ids = manifest.column("id")
    out = []
    for q in range(n):
        hits = []
        ranked = zip(best_rows[q].tolist(), best_scores[q].tolist(), strict=True)
        for rank, (row, score) in enumerate(ranked, 1):
            media = _cell(manifest, modality, row) if modality in FILE_COLUMNS else None
            if media is not None:
                media = str((manifest.root / media).resolve()) if "::" not in media and not \
                    Path(media).is_absolute() else media
            hits.append(Hit(rank, int(row), str(ids[row]), float(score), media,
                            _cell(manifest, "text", row), _cell(manifest, "label", row)))
        out.append(hits)
    return out
