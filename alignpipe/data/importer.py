"""`alignpipe import`: embeddings computed elsewhere become a store, without opening media.

Two inputs are understood:

- a ``.npy`` file of shape rows × dim whose row i is manifest row i;
- a clip-retrieval output folder: ``img_emb/img_emb_N.npy`` (or ``text_emb/text_emb_N.npy``)
  beside ``metadata/metadata_N.parquet``; rows are matched to the manifest by a key column.

The store is built in a staging folder under the store's lock and swapped into place only when
complete (the old store renamed aside, the new one renamed in, the old one deleted), so a
rejected import leaves nothing behind and a kill at any moment leaves one whole store.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from alignpipe.data.manifest import FILE_COLUMNS, Manifest, file_sha256, read_manifest
from alignpipe.data.store import (
    MODALITIES,
    create_store,
    lock_store,
    open_store,
    staged_store_path,
    store_path,
)
from alignpipe.util.errors import ImportDataError, format_rows

EMB_FOLDERS = {"image": "img_emb", "text": "text_emb"}
DEFAULT_KEYS = {"image": ("image_path", "image"), "text": ("caption", "text")}


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    found = {}
    for path in folder.glob(f"{prefix}_*{suffix}"):
        m = re.fullmatch(rf"{prefix}_(\d+){re.escape(suffix)}", path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def _check_finite(block: np.ndarray, first_row: int, where: str) -> None:
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if bad.size:
        raise ImportDataError(
            f"{where}: NaN or inf values at rows {format_rows([first_row + int(b) for b in bad])}")


class _Source:
    """Gives the latents of manifest rows [start, stop) plus which of them exist."""

    dim: int
    description: dict

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class _NpySource(_Source):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ImportDataError(f"{path}: cannot read as a .npy array: {err}") from None
        if self.array.ndim != 2:
            raise ImportDataError(f"{path}: expected a 2-d array rows × dim, got shape "
                                  f"{self.array.shape}")
        if self.array.shape[0] != manifest.rows:
            raise ImportDataError(
                f"{path}: has {self.array.shape[0]} rows but manifest {manifest.path} has "
                f"{manifest.rows}; row i of the array must be row i of the manifest")
        if not np.issubdtype(self.array.dtype, np.floating):
            raise ImportDataError(f"{path}: expected floating-point latents, got "
                                  f"{self.array.dtype}")
        self.path = path
        self.dim = int(self.array.shape[1])
        self.description = {"source": str(path.resolve()), "source_sha256": file_sha256(path)}

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(self.array[start:stop], dtype=np.float32)
        _check_finite(values, start, str(self.path))
        return values, np.ones(stop - start, dtype=bool)


class _ClipRetrievalSource(_Source):
    def __init__(self, folder: Path, manifest: Manifest, modality: str, key: str | None,
                 allow_unmatched: bool) -> None:
        if modality not in EMB_FOLDERS:
            raise ImportDataError(f"{folder}: clip-retrieval folders hold image or text "
                                  f"embeddings, not {modality}")
        emb_name = EMB_FOLDERS[modality]
        embs = _numbered(folder / emb_name, emb_name, ".npy")
        metas = _numbered(folder / "metadata", "metadata", ".parquet")
        if not embs:
            raise ImportDataError(f"{folder}: no {emb_name}/{emb_name}_N.npy files found")
        missing = sorted(set(embs) - set(metas))
        if missing:
            raise ImportDataError(f"{folder}: {emb_name}_{missing[0]}.npy has no "
                                  f"metadata/metadata_{missing[0]}.parquet beside it")
        meta_col, man_col = DEFAULT_KEYS[modality]
        if key:
            meta_col, _, man_col_opt = key.partition("=")
            man_col = man_col_opt or man_col
        if not manifest.has(man_col):
            raise ImportDataError(f"{manifest.path}: manifest has no column {man_col!r} to "
                                  f"match on; use --key METADATA_COLUMN=MANIFEST_COLUMN")

        self.arrays: list[np.ndarray] = []
        lookup: dict[str, tuple[int, int]] = {}
        dim = None
        for file_no, n in enumerate(sorted(embs)):
            array = np.load(embs[n], mmap_mode="r", allow_pickle=False)
            meta = pq.read_table(metas[n])
            if meta_col not in meta.column_names:
                raise ImportDataError(
                    f"{metas[n]}: no column {meta_col!r} (columns: "
                    f"{', '.join(meta.column_names)}); use --key to name the key column")
            if array.ndim != 2 or array.shape[0] != meta.num_rows:
                raise ImportDataError(
                    f"{embs[n]}: {array.shape[0]} embeddings but {metas[n].name} has "
                    f"{meta.num_rows} rows")
            if dim is not None and array.shape[1] != dim:
                raise ImportDataError(f"{embs[n]}: dim {array.shape[1]} differs from {dim} in "
                                      f"the earlier files")
            dim = int(array.shape[1])
            self.arrays.append(array)
            for row, value in enumerate(meta.column(meta_col).to_pylist()):
                lookup.setdefault(str(value), (file_no, row))

        keys = manifest.column(man_col)
        resolved = (manifest.media_paths(man_col) if man_col in FILE_COLUMNS
                    else [None] * manifest.rows)
        self.file_of = np.full(manifest.rows, -1, dtype=np.int64)
        self.row_of = np.zeros(manifest.rows, dtype=np.int64)
        unmatched = []
        for i, (k, alt) in enumerate(zip(keys, resolved, strict=True)):
            hit = lookup.get(str(k)) or (lookup.get(str(alt)) if alt is not None else None)
            if hit is None:
                unmatched.append(i)
            else:
                self.file_of[i], self.row_of[i] = hit
        if unmatched and not allow_unmatched:
            raise ImportDataError(
                f"{folder}: {len(unmatched)} manifest rows have no embedding (no metadata row "
                f"with {meta_col} equal to the manifest's {man_col}): rows "
                f"{format_rows(unmatched)}; pass --allow-unmatched to mark them invalid")
        self.unmatched = unmatched
        self.dim = int(dim)
        self.folder = folder
        self.description = {"source": str(folder.resolve()), "key": f"{meta_col}={man_col}",
                            "files": len(embs)}

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((stop - start, self.dim), dtype=np.float32)
        files = self.file_of[start:stop]
        rows = self.row_of[start:stop]
        for f in np.unique(files[files >= 0]):
            sel = np.flatnonzero(files == f)
            order = np.argsort(rows[sel])  # mmap reads are fastest in ascending order
            values = np.asarray(self.arrays[f][rows[sel][order]], dtype=np.float32)
            out[sel[order]] = values
        valid = files >= 0
        _check_finite(np.where(valid[:, None], out, 0), start, str(self.folder))
        return out, valid


def import_latents(latents: str | Path, *, manifest: str | Path, modality: str, encoder: str,
                   cache: str | Path = "cache", dataset: str | None = None,
                   key: str | None = None, allow_unmatched: bool = False,
                   dtype: str = "float16", unit_rows: int = 8192,
                   overwrite: bool = False) -> dict:
    """Build a store from precomputed latents; returns a summary dict."""
    latents = Path(latents)
    if modality not in MODALITIES:
        raise ImportDataError(f"unknown modality {modality!r}; use one of "
                              f"{', '.join(MODALITIES)}")
    man = read_manifest(manifest)
    if not latents.exists():
        raise ImportDataError(f"{latents}: no such file or folder")
    if latents.is_dir():
        source: _Source = _ClipRetrievalSource(latents, man, modality, key, allow_unmatched)
    elif latents.suffix == ".npy":
        source = _NpySource(latents, man)
    else:
        raise ImportDataError(f"{latents}: expected a .npy file or a clip-retrieval folder")

    target = store_path(cache, dataset or man.name, encoder)
    spec = {"name": encoder, "backend": "import", "model_id": None, "revision": None,
            "weights_sha256": None, "pooling": None, "preprocessing": None,
            **source.description}
    with lock_store(target), staged_store_path(target, overwrite=overwrite) as staging:
        store = create_store(staging, rows=man.rows, dim=source.dim, encoder=spec,
                             modality=modality, manifest=man, dtype=dtype, unit_rows=unit_rows)
        limit = np.finfo(np.float16).max if dtype == "float16" else np.inf
        for unit in range(store.n_units):
            start, stop = store.unit_range(unit)
            values, valid = source.block(start, stop)
            too_big = np.flatnonzero((np.abs(values) > limit).any(axis=1) & valid)
            if too_big.size:
                raise ImportDataError(
                    f"{latents}: values beyond the float16 range at rows "
                    f"{format_rows([start + int(r) for r in too_big])}; use --dtype float32")
            failures = [{"id": man.ids[start + i], "row": start + i, "column": modality,
                         "reason": "no embedding for this row in the imported data"}
                        for i in np.flatnonzero(~valid)]
            store.write_unit(unit, values, valid, failures, ids=man.ids[start:stop])
        store.merge_failures()
    final = open_store(target)
    return {"path": str(target), "rows": final.rows, "dim": final.dim,
            "valid": int(final.read_valid().sum())}
