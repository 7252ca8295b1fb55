"""`alignpipe similarity`: how alike are the latent spaces of several stores of one manifest?

Two measures, on the same sample of rows valid in every store (one row per media item, so five
captions of one image do not count as five neighbours):

- **linear CKA** (Kornblith et al. 2019), freeze-align's criterion for picking encoder pairs:
  ``‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)`` on column-centred X, Y. 1 for spaces equal up to a rotation
  and an isotropic scaling.
- **mutual kNN** (Huh et al. 2024): the mean fraction of each row's k cosine nearest neighbours
  (itself excluded) that the two spaces share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from alignpipe.data.manifest import FILE_COLUMNS
from alignpipe.data.pairing import (
    ManifestArg,
    check_same_manifest,
    media_items,
    partial_notes,
    read_rows,
    stage_two_store,
    store_manifests,
    valid_rows,
)
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from alignpipe.data.manifest import Manifest
    from alignpipe.data.store import LatentStore

KNN_CHUNK = 2048


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA of two row-aligned representations (rows × dims), in float64."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same rows on both sides, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    if x.shape[0] < max(x.shape[1], y.shape[1]):  # the n × n Gram form is cheaper here
        gx, gy = x @ x.T, y @ y.T
        cross, nx, ny = (gx * gy).sum(), gx.norm(), gy.norm()
    else:
        cross, nx, ny = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float(cross / (nx * ny))


def knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k cosine nearest neighbours, the row itself excluded."""
    x = F.normalize(x.float(), dim=-1)
    out = []
    for start in range(0, x.shape[0], KNN_CHUNK):
        sims = x[start:start + KNN_CHUNK] @ x.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -torch.inf
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def mutual_knn(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, k: int = 10) -> float:
    """Mean over rows of |kNN_x(i) ∩ kNN_y(i)| / k."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError("mutual kNN needs the same rows on both sides")
    if not 1 <= k < x.shape[0]:
        raise AlignpipeError(f"mutual kNN needs 1 ≤ k < rows ({x.shape[0]}), got k={k}")
    return _shared_fraction(knn_indices(x, k), knn_indices(y, k))


def _shared_fraction(nx: torch.Tensor, ny: torch.Tensor) -> float:
    shared = (nx[:, :, None] == ny[:, None, :]).any(dim=2).sum(dim=1)
    return float(shared.double().mean() / nx.shape[1])


def _sample_rows(stores: list[LatentStore], manifest: Manifest, sample: int,
                 seed: int) -> tuple[np.ndarray, int]:
    """Sorted rows valid in every store, one per media item; and how many were eligible."""
    kept, _ = valid_rows(stores, np.arange(stores[0].rows))
    modalities = {s.modality for s in stores if s.modality in FILE_COLUMNS}
    if modalities:
        keys = np.stack([media_items(manifest, m, kept) for m in sorted(modalities)], axis=1)
        kept = kept[np.sort(np.unique(keys, axis=0, return_index=True)[1])]
    if kept.size < 3:
        raise AlignpipeError(f"only {kept.size} rows are valid in every store; similarity "
                             f"needs a few hundred")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(kept, size=min(sample, kept.size), replace=False)
    return np.sort(chosen), int(kept.size)


def _names(stores: list[LatentStore]) -> list[str]:
    names = [s.path.name for s in stores]
    if len(set(names)) < len(names):
        names = [f"{s.path.parent.name}/{s.path.name}" for s in stores]
    return names


def similarity(stores: list, *, sample: int = 5000, k: int = 10, seed: int = 0,
               manifest: ManifestArg = None, allow_partial: bool = False) -> dict:
    """Linear CKA and mutual-kNN matrices between every pair of stores of one manifest.

    `manifest` says where the stores' manifest is now (when it moved without them);
    `allow_partial` compares unfinished stores on the rows embedded so far. Nothing is
    written (`alignpipe.app.results.write_similarity` writes the JSON and heatmaps).
    """
    if len(stores) < 2:
        raise AlignpipeError("similarity compares at least two stores")
    opened = [stage_two_store(s, allow_partial=allow_partial) for s in stores]
    check_same_manifest(opened)
    manifest = store_manifests(opened, manifest)[0]
    rows, eligible = _sample_rows(opened, manifest, sample, seed)
    k = min(k, rows.size - 1)
    latents = [torch.from_numpy(read_rows(s, rows)) for s in opened]
    if k < 1:
        raise AlignpipeError(f"mutual kNN needs 1 ≤ k < rows ({rows.size}), got k={k}")
    neighbours = [knn_indices(x, k) for x in latents]  # once per store, not once per pair
    n = len(opened)
    cka, knn = np.eye(n), np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            cka[i, j] = cka[j, i] = linear_cka(latents[i], latents[j])
            knn[i, j] = knn[j, i] = _shared_fraction(neighbours[i], neighbours[j])
    result = {"stores": [str(s.path) for s in opened], "names": _names(opened),
              "modalities": [s.modality for s in opened],
              "encoders": [s.encoder.get("name") for s in opened],
              "linear_cka": cka.round(6).tolist(), "mutual_knn": knn.round(6).tolist(),
              "k": k, "sample": int(rows.size), "eligible_rows": eligible, "seed": seed}
    if notes := partial_notes(opened):
        result["partial"] = notes
    return result
