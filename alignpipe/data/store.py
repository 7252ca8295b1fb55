"""The latent store: the contract between stage one and stage two.

A store is a Zarr v3 group at ``<cache>/<dataset>/<encoder>/`` holding

- ``latents``: rows × dim, float16 (float32 on request); shards of exactly one work unit of rows,
  chunks of about 1-4 MB inside them. A shard is the unit of writing, a chunk the unit of reading.
- ``valid``: rows, bool; false for rows whose media failed (see ``failures.parquet``).
- ``units/``: a subgroup whose folder holds one ``NNNNN.done`` marker per completed work unit and
  that unit's failures; the marker lists the files the unit wrote with sizes and sha256, so a
  rerun skips intact units and redoes damaged ones. Chunks carry a crc32c checksum.
- group attrs: ``encoder`` (provenance), ``modality``, ``manifest`` (path, sha256, rows, and
  relative_path from the store when both lie under one folder),
  ``alignpipe_version``, ``created``, ``unit_rows``.

Row i of the store is row i of its manifest. ``zarr.open_group(path)["latents"]`` and
``dask.array.from_zarr(path, component="latents")`` read it without alignpipe.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from alignpipe._version import __version__
from alignpipe.data.manifest import Manifest
from alignpipe.data.storefiles import (
    failures_file,
    file_problems,
    file_record,
    remove_empty_folders,
    remove_folder_and_failures,
    remove_leftovers,
    set_aside,
    staging_path,
    swap_in,
)
from alignpipe.util.constants import LATENT_DTYPES, MODALITIES
from alignpipe.util.errors import AlignpipeError, StoreError
from alignpipe.util.fsutil import atomic_path, atomic_write_bytes, exclusive_lock

DEFAULT_UNIT_ROWS = 8192
TARGET_CHUNK_BYTES = 2 << 20
FAILURE_COLUMNS = ("id", "row", "column", "reason")
UNITS_GROUP = "units"


def encoder_dirname(name: str) -> str:
    """Folder name for an encoder: ``hf:facebook/dinov2-large`` -> ``hf-facebook--dinov2-large``."""
    name = name.replace("/", "--").replace(":", "-")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def store_path(cache: str | Path, dataset: str, encoder: str) -> Path:
    return Path(cache) / dataset / encoder_dirname(encoder)


def manifest_attrs(path: Path, manifest_info: dict) -> dict:
    """The store's ``manifest`` attr: `manifest_info` plus ``relative_path`` from the store folder
    to the manifest when the two share a folder below the filesystem root, so that moving both
    together (a copied project, a renamed checkout) keeps the store usable."""
    info = {k: v for k, v in manifest_info.items() if k != "relative_path"}
    if not info.get("path"):
        return info
    store, manifest = Path(path).resolve(), Path(info["path"]).resolve()
    try:
        common = Path(os.path.commonpath([store, manifest]))
    except ValueError:  # different drives
        return info
    if common != Path(common.anchor):
        info["relative_path"] = os.path.relpath(manifest, store)
    return info


def shard_layout(unit_rows: int, dim: int, itemsize: int) -> tuple[int, int]:
    """``(chunk_rows, unit_rows)``: chunks of about 2 MB that tile a shard of one work unit.

    Zarr needs the shard's rows to be a multiple of the chunk's. A divisor of `unit_rows` between
    half the byte target and the target keeps `unit_rows` as asked; otherwise (a prime row count,
    say) the unit grows by less than one row per chunk to the next multiple, never down to
    one-row chunks. The array's length need not be a multiple of either: its last shard is
    partial.
    """
    target = max(1, TARGET_CHUNK_BYTES // max(1, dim * itemsize))
    if unit_rows <= target:
        return unit_rows, unit_rows
    for rows in range(target, (target + 1) // 2 - 1, -1):
        if unit_rows % rows == 0:
            return rows, unit_rows
    chunks = math.ceil(unit_rows / target)
    rows = math.ceil(unit_rows / chunks)
    return rows, rows * chunks


def chunk_rows_for(unit_rows: int, dim: int, itemsize: int) -> int:
    """Rows per chunk of a store whose work units hold `unit_rows` rows (see `shard_layout`)."""
    return shard_layout(unit_rows, dim, itemsize)[0]


def checked_codecs() -> list:
    """zstd, then a crc32c checksum per chunk, so a flipped byte is an error, never a value."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0, checksum=False), Crc32cCodec()]


def write_failures(path: Path, failures: list[dict]) -> None:
    """Write failure records (id, row, column, reason) as parquet, atomically."""
    table = pa.table({
        "id": pa.array([str(f["id"]) for f in failures], pa.string()),
        "row": pa.array([int(f["row"]) for f in failures], pa.int64()),
        "column": pa.array([str(f["column"]) for f in failures], pa.string()),
        "reason": pa.array([str(f["reason"]) for f in failures], pa.string()),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_failures(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.exists() else []


@dataclass
class LatentStore:
    """An open store. Create with `create_store`, open with `open_store`."""

    path: Path
    group: zarr.Group

    # ---- layout -------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @cached_property
    def latents(self) -> zarr.Array:
        return self.group["latents"]  # opened once: each lookup would reread its zarr.json

    @cached_property
    def valid(self) -> zarr.Array:
        return self.group["valid"]

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    @property
    def dim(self) -> int:
        return int(self.latents.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.latents.dtype)

    @property
    def unit_rows(self) -> int:
        return int(self.attrs["unit_rows"])

    @property
    def n_units(self) -> int:
        return max(1, math.ceil(self.rows / self.unit_rows)) if self.rows else 0

    @property
    def encoder(self) -> dict:
        return dict(self.attrs.get("encoder", {}))

    @property
    def modality(self) -> str:
        return str(self.attrs.get("modality", ""))

    @property
    def manifest_info(self) -> dict:
        return dict(self.attrs.get("manifest", {}))

    @property
    def units_dir(self) -> Path:
        return self.path / UNITS_GROUP

    @property
    def failures_path(self) -> Path:
        """Merged failure table, beside the store folder (the store root holds only Zarr)."""
        return failures_file(self.path)

    def unit_range(self, unit: int) -> tuple[int, int]:
        if not 0 <= unit < self.n_units:
            raise IndexError(f"work unit {unit} out of range 0..{self.n_units - 1}")
        start = unit * self.unit_rows
        return start, min(start + self.unit_rows, self.rows)

    # ---- work units ---------------------------------------------------------------------------
    def _marker(self, unit: int) -> Path:
        return self.units_dir / f"{unit:05d}.done"

    def _unit_failures(self, unit: int) -> Path:
        return self.units_dir / f"{unit:05d}.failures.parquet"

    def _unit_files(self, unit: int) -> list[str]:
        """The files unit `unit` writes, relative to the store folder."""
        return [f"latents/{self.latents.metadata.encode_chunk_key((unit, 0))}",
                f"valid/{self.valid.metadata.encode_chunk_key((unit,))}",
                f"{UNITS_GROUP}/{self._unit_failures(unit).name}"]

    def _marked_units(self) -> list[int]:
        """Units with a completion marker, intact or not."""
        if not self.units_dir.exists():
            return []
        marked = []
        for p in self.units_dir.glob("*.done"):
            try:
                marked.append(int(p.stem))
            except ValueError:
                continue
        return sorted(u for u in marked if u < self.n_units)

    def unit_problems(self, unit: int, checksums: bool = False) -> list[str]:
        """Why finished unit `unit` is damaged; empty when it is intact or not finished.

        Without `checksums` only existence and sizes are compared (a few stat calls per unit);
        with it every file is hashed. Markers written before files were recorded are checked
        for what their counts imply.
        """
        try:
            marker = json.loads(self._marker(unit).read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return ["its completion marker is unreadable"]
        files = marker.get("files") if isinstance(marker, dict) else None
        if not isinstance(marker, dict) or "files" in marker and not isinstance(files, dict):
            return ["its completion marker is unreadable"]
        if files is not None:
            return file_problems(self.path, files, checksums)
        return self._legacy_problems(unit, marker, checksums)

    def _legacy_problems(self, unit: int, marker: dict, checksums: bool) -> list[str]:
        latents_file, valid_file, failures_file_name = self._unit_files(unit)
        expected = [failures_file_name] + ([latents_file, valid_file]
                                           if int(marker.get("valid", 0)) > 0 else [])
        problems = [f"{name} is missing" for name in expected if not (self.path / name).exists()]
        if checksums and not problems:
            start, stop = self.unit_range(unit)
            try:
                self.latents[start:stop]  # decoding checks what can be checked
                valid = int(np.asarray(self.valid[start:stop]).sum())
                read_failures(self._unit_failures(unit))
            except (ValueError, RuntimeError, OSError, pa.ArrowException) as err:
                return [f"cannot be decoded ({err})"]
            if valid != int(marker.get("valid", valid)):
                problems.append(f"valid marks {valid} rows valid, {marker['valid']} when written")
        return problems

    def damaged_units(self, checksums: bool = False) -> dict[int, str]:
        """Finished units whose files are gone or changed: unit -> reason.

        The cheap check (default) finds deleted and truncated files; `checksums` also finds
        changed bytes (``alignpipe info --verify``).
        """
        damaged = {}
        for unit in self._marked_units():
            problems = self.unit_problems(unit, checksums)
            if problems:
                damaged[unit] = "; ".join(problems)
        return damaged

    def is_done(self, unit: int) -> bool:
        """Finished and intact (cheap check): a damaged unit is redone like an unfinished one."""
        return self._marker(unit).exists() and not self.unit_problems(unit)

    def done_units(self) -> list[int]:
        """Finished units that pass the cheap check."""
        return [u for u in self._marked_units() if not self.unit_problems(u)]

    def pending_units(self) -> list[int]:
        """Units to (re)do: never finished, or finished and since damaged."""
        done = set(self.done_units())
        return [u for u in range(self.n_units) if u not in done]

    def forget_units(self, units: Iterable[int]) -> None:
        """Remove the completion markers of `units`: the next embed redoes them."""
        for unit in units:
            self._marker(unit).unlink(missing_ok=True)

    def repair_command(self, verify: bool = False) -> str:
        """The command that redoes this store's damaged or missing units; `verify` adds
        ``--verify`` for damage only checksums find (embed's cheap check would skip it)."""
        found = [p for p in self.manifest_locations() if p.exists()]  # after a move too
        encoder = self.encoder
        manifest = found[0] if found else self.manifest_info.get("path") or "MANIFEST"
        where = ["--cache", self.path.parent.parent, "--dataset", self.path.parent.name]
        if encoder.get("backend") == "import":
            parts = ["alignpipe", "import", encoder.get("source") or "LATENTS", "--manifest",
                     manifest, "--modality", self.modality, "--encoder", encoder.get("name"),
                     *where, "--dtype", self.dtype, "--unit-rows", self.unit_rows]
            parts += ["--key", encoder["key"]] if encoder.get("key") else []
            return shlex.join(map(str, [*parts, "--overwrite"]))
        request = dict(encoder.get("request") or {})
        parts = ["alignpipe", "embed", manifest, "--encoder", encoder.get("name", "ENCODER"),
                 *where]
        if encoder.get("weights_path"):
            parts += ["--weights", encoder["weights_path"]]
        elif encoder.get("weights") == "random":
            parts += ["--weights", "random"]
        for option, key in (("--column", "column"), ("--image-size", "image_size"),
                            ("--pooling", "pooling")):
            if request.get(key, encoder.get(key)) is not None:
                parts += [option, request.get(key, encoder.get(key))]
        return shlex.join(map(str, [*parts, "--latent-dtype", self.dtype,
                                    *(["--verify"] if verify else [])]))

    def damage_message(self, damaged: dict[int, str], detail: str = "") -> str:
        if damaged:
            shown = "; ".join(f"unit {u} ({reason})" for u, reason in list(damaged.items())[:5])
            more = f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""
            what = f"{len(damaged)} damaged work unit(s): {shown}{more}"
        else:
            what = f"damaged data ({detail})"
        # changed bytes of the right size pass the cheap check an embed rerun makes
        hidden = not damaged or any(not self.unit_problems(u) for u in damaged)
        return (f"{self.path}: {what}; rerun the command that made it to redo them: "
                f"{self.repair_command(verify=hidden)}")

    def require_intact(self) -> None:
        """Raise StoreError naming every damaged unit and the repair command (cheap check)."""
        damaged = self.damaged_units()
        if damaged:
            raise StoreError(self.damage_message(damaged))

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around zarr reads: a chunk that fails its crc32c or cannot be decoded becomes the
        damaged-store StoreError (units and repair command), not a zarr traceback."""
        try:
            yield
        except (ValueError, RuntimeError) as err:
            if not any(word in str(err).lower() for word in ("checksum", "compress", "corrupt")):
                raise  # not a damaged chunk (zarr says so in these words)
            damaged = self.damaged_units(checksums=True)
            raise StoreError(self.damage_message(damaged, str(err))) from None

    def write_unit(self, unit: int, latents: np.ndarray, valid: np.ndarray,
                   failures: list[dict] | None = None, stats: dict | None = None,
                   ids: list[str] | None = None) -> None:
        """Write one work unit's whole shard, its failures, then its completion marker.

        The marker is removed first and written last, atomically, listing the files written
        with their sizes and sha256; a kill at any point leaves the unit either complete and
        marked, or unmarked (and redone on the next run). Rows whose latents are not finite in
        the store's dtype (float16 overflows at 65504) become failures; `ids` (the unit's
        manifest ids) names them, else the manifest is read.
        """
        start, stop = self.unit_range(unit)
        latents = np.asarray(latents)
        valid = np.asarray(valid, dtype=bool)
        if latents.shape != (stop - start, self.dim):
            raise StoreError(f"{self.path}: unit {unit} needs latents of shape "
                             f"{(stop - start, self.dim)}, got {latents.shape}")
        if valid.shape != (stop - start,):
            raise StoreError(f"{self.path}: unit {unit} needs valid of shape {(stop - start,)}")
        latents, valid, failures = self._storable(start, latents, valid, list(failures or []),
                                                  ids)
        self._marker(unit).unlink(missing_ok=True)  # a rewrite cut short must not look done
        files = self._unit_files(unit)
        for name in files:  # a rewrite never reads (or keeps) a damaged shard
            (self.path / name).unlink(missing_ok=True)
        self.latents[start:stop] = latents
        self.valid[start:stop] = valid
        self.units_dir.mkdir(exist_ok=True)
        write_failures(self._unit_failures(unit), failures)
        marker = {**(stats or {}), "unit": unit, "rows": [start, stop],
                  "valid": int(valid.sum()), "failed": len(failures), "finished": time.time(),
                  "files": {name: file_record(self.path / name) for name in files}}
        atomic_write_bytes(self._marker(unit), json.dumps(marker).encode())

    def _storable(self, start: int, latents: np.ndarray, valid: np.ndarray, failures: list[dict],
                  ids: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Latents cast to the store's dtype; rows not finite after the cast become failures."""
        with np.errstate(over="ignore", invalid="ignore"):
            stored = np.where(valid[:, None], latents, 0).astype(self.dtype, copy=False)
        bad = np.flatnonzero(valid & ~np.isfinite(stored).all(axis=1))
        if not bad.size:
            return stored, valid, failures
        stored[bad] = 0
        valid = valid.copy()
        valid[bad] = False
        source_finite = np.isfinite(latents[bad]).all(axis=1)
        column = (failures[0]["column"] if failures
                  else self.encoder.get("column") or self.modality)
        names = ([str(ids[i]) for i in bad] if ids is not None
                 else self._manifest_ids(start + bad))
        overflow = (f"latent exceeds {self.dtype} range"
                    + ("; use --latent-dtype float32" if self.dtype == "float16" else ""))
        failures += [{"id": name, "row": start + int(i), "column": column,
                      "reason": overflow if finite else "latent is NaN or inf"}
                     for i, finite, name in zip(bad, source_finite, names, strict=True)]
        return stored, valid, sorted(failures, key=lambda f: f["row"])

    def manifest_locations(self) -> list[Path]:
        """Where this store's manifest may be: at its path relative to the store (which follows
        a project moved as a whole), then at the absolute path recorded when it was built."""
        info, found = self.manifest_info, []
        if info.get("relative_path"):
            found.append((self.path.resolve() / info["relative_path"]).resolve())
        if info.get("path"):
            found.append(Path(info["path"]))
        return list(dict.fromkeys(found))

    def _manifest_ids(self, rows: np.ndarray) -> list[str]:
        """Manifest ids of `rows`, read from the store's manifest ("" where it is gone)."""
        from alignpipe.data.manifest import read_manifest

        for path in self.manifest_locations():
            try:
                manifest = read_manifest(path)
            except (AlignpipeError, OSError):
                continue
            if manifest.sha256 == self.manifest_info.get("sha256"):
                return [manifest.ids[int(r)] for r in rows]
        return [""] * len(rows)

    def unit_marker(self, unit: int) -> dict:
        path = self._marker(unit)
        return json.loads(path.read_text()) if path.exists() else {}

    def failures(self) -> list[dict]:
        """Failure records of all completed units, in row order."""
        records: list[dict] = []
        for unit in self.done_units():
            try:
                records.extend(read_failures(self._unit_failures(unit)))
            except (OSError, pa.ArrowException) as err:
                damaged = self.damaged_units(checksums=True) or {unit: str(err)}
                raise StoreError(self.damage_message(damaged)) from None
        return sorted(records, key=lambda r: r["row"])

    def merge_failures(self) -> Path:
        """Write the merged ``failures.parquet`` beside the store and return its path."""
        write_failures(self.failures_path, self.failures())
        return self.failures_path

    @property
    def complete(self) -> bool:
        return len(self.done_units()) == self.n_units

    # ---- reading ------------------------------------------------------------------------------
    def read_valid(self) -> np.ndarray:
        with self.reading():
            return np.asarray(self.valid[:], dtype=bool)

    def read(self, rows: np.ndarray | list[int] | slice | None = None,
             dtype: str | np.dtype = np.float32) -> np.ndarray:
        """Latents of `rows` (all rows by default) as a numpy array of `dtype`."""
        with self.reading():
            if rows is None:
                out = self.latents[:]
            elif isinstance(rows, slice):
                out = self.latents[rows]
            else:
                idx = np.asarray(rows, dtype=np.int64)
                if idx.size == 0:
                    return np.zeros((0, self.dim), dtype=dtype)
                out = self.latents.get_orthogonal_selection((idx, slice(None)))
        return np.asarray(out).astype(dtype, copy=False)

    def check_manifest(self, manifest: Manifest) -> None:
        """Raise StoreError unless this store was built from exactly this manifest."""
        info = self.manifest_info
        if info.get("sha256") != manifest.sha256:
            raise StoreError(
                f"{self.path}: store was built from manifest {info.get('path')} "
                f"(sha256 {str(info.get('sha256'))[:12]}…, {info.get('rows')} rows) but "
                f"{manifest.path} has sha256 {manifest.sha256[:12]}… ({manifest.rows} rows); "
                f"row i of a store must be row i of its manifest, so re-embed or pass the "
                f"original manifest")

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def info(self) -> dict:
        damaged = self.damaged_units()
        try:
            valid = int(self.read_valid().sum())
        except StoreError:  # reported through damaged_units; count what the markers say
            valid = sum(int(self.unit_marker(u).get("valid", 0)) for u in self.done_units())
        return {
            "path": str(self.path),
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "valid": valid,
            "modality": self.modality,
            "encoder": self.encoder,
            "manifest": self.manifest_info,
            "alignpipe_version": self.attrs.get("alignpipe_version"),
            "created": self.attrs.get("created"),
            "unit_rows": self.unit_rows,
            "units_done": len(self.done_units()),
            "units_total": self.n_units,
            "damaged_units": {str(u): reason for u, reason in damaged.items()},
            "chunks": list(self.latents.chunks),
            "shards": list(self.latents.shards or self.latents.chunks),
            "size_bytes": self.size_on_disk(),
            "failures": len(self.failures()),
        }


def create_store(path: str | Path, *, rows: int, dim: int, encoder: dict, modality: str,
                 manifest: Manifest | dict, dtype: str = "float16",
                 unit_rows: int = DEFAULT_UNIT_ROWS, overwrite: bool = False,
                 extra_attrs: dict | None = None) -> LatentStore:
    """Create a store at full size. Workers only ever fill shards; nothing resizes later."""
    path = Path(path)
    if dtype not in LATENT_DTYPES:
        raise StoreError(f"unsupported latent dtype {dtype!r}; use one of "
                         f"{', '.join(LATENT_DTYPES)}")
    if modality not in MODALITIES:
        raise StoreError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if rows < 1 or dim < 1 or unit_rows < 1:
        raise StoreError(f"a store needs rows, dim and unit_rows ≥ 1 (got {rows}, {dim}, "
                         f"{unit_rows})")
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path}: a store already exists here; pass --overwrite to replace it")
        remove_store(path)
    manifest_info = manifest.info() if isinstance(manifest, Manifest) else dict(manifest)
    if int(manifest_info.get("rows", rows)) != rows:
        raise StoreError(f"{path}: store rows ({rows}) must equal manifest rows "
                         f"({manifest_info['rows']})")
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk_rows, unit_rows = shard_layout(min(unit_rows, rows), dim, np.dtype(dtype).itemsize)
    attrs = {
        "encoder": {**encoder, "dim": dim},
        "modality": modality,
        "manifest": manifest_attrs(path, manifest_info),
        "alignpipe_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "unit_rows": unit_rows,
        **(extra_attrs or {}),
    }
    group = zarr.open_group(path, mode="w", attributes=attrs)
    group.create_array("latents", shape=(rows, dim), dtype=dtype, chunks=(chunk_rows, dim),
                       shards=(unit_rows, dim), fill_value=0, compressors=checked_codecs())
    group.create_array("valid", shape=(rows,), dtype="bool", chunks=(unit_rows,),
                       fill_value=False, compressors=checked_codecs())
    group.create_group(UNITS_GROUP, attributes={
        "about": "one NNNNN.done marker per completed work unit, plus that unit's failures"})
    return LatentStore(path=path, group=group)


def is_store(path: str | Path) -> bool:
    path = Path(path)
    return (path / "zarr.json").exists() and (path / "latents" / "zarr.json").exists()


def open_store(path: str | Path, manifest: Manifest | None = None,
               mode: str = "r") -> LatentStore:
    """Open a store; with `manifest`, also check it was built from exactly that manifest."""
    path = Path(path)
    if not path.exists() and set_aside(path):
        with lock_store(path):  # an import killed mid-swap set the old store aside: put it back
            pass
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if not is_store(path):
        raise StoreError(f"{path}: not an alignpipe latent store (no Zarr group with 'latents')")
    try:
        group = zarr.open_group(path, mode=mode)
        store = LatentStore(path=path, group=group)
        for name in ("latents", "valid"):  # their zarr.json are read here, not at first use
            getattr(store, name)
    except KeyError as err:
        raise StoreError(f"{path}: damaged store: its {err.args[0]!r} array is missing") from None
    except Exception as err:  # zarr raises several types for a damaged group or array
        raise StoreError(f"{path}: damaged store, its metadata (zarr.json) cannot be read: "
                         f"{err}") from None
    for key in ("encoder", "modality", "manifest", "unit_rows"):
        if key not in store.attrs:
            raise StoreError(f"{path}: store attrs lack {key!r}; was it written by alignpipe?")
    if manifest is not None:
        store.check_manifest(manifest)
    return store


def remove_store(path: str | Path) -> None:
    remove_folder_and_failures(Path(path))


def lock_path(path: str | Path) -> Path:
    """The writer lock of the store at `path`: beside the folder, which may be replaced."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def lock_store(path: str | Path) -> Iterator[None]:
    """Be the only writer of the store at `path` while the body runs.

    Refuses (LockedError) while another live process holds ``<store>.lock``; takes over the lock
    of a dead one. Once held, clears what killed writers left (staging folders, an old store
    set aside by an interrupted swap, temporary marker files). Folders it had to create for the
    lock are removed again if they are empty at the end.
    """
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        with exclusive_lock(lock_path(path), f"store {path}"):
            if remove_leftovers(path) and is_store(path) and not failures_file(path).exists():
                with suppress(StoreError):  # a restored store's table, if lost
                    open_store(path).merge_failures()
            yield
    finally:
        remove_empty_folders(created)


@contextmanager
def staged_store_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success swap it in at `path`, on error delete it.

    For writers that build a whole store in one go (``alignpipe import``), under `lock_store`: a
    failure leaves nothing half-written behind, and an existing store is replaced by renames
    only once the new one is done, so a kill at any moment leaves one whole store.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: a store already exists here; pass --overwrite to replace it")
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    try:
        yield tmp
    except BaseException:
        remove_store(tmp)
        remove_empty_folders(created)  # innermost first: leave no empty folders we made
        raise
    swap_in(tmp, path)
