"""Reading media cells: image and audio files, plain or inside uncompressed tar shards.

A media cell is a path relative to the manifest folder (or absolute), or ``ARCHIVE.tar::MEMBER``
for a member of a webdataset / img2dataset shard. Every failure raises `MediaError` with a
reason a person can act on ("file not found", "truncated", ...); the embed engine turns that into
a failure record for the row instead of stopping the run.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, UnidentifiedImageError

from alignpipe.util.constants import ARCHIVE_SEPARATOR

# 0xFFFFFFFF and 0 are what streaming writers put in a WAV header before they know the length.
_STREAMED_SIZES = (0, 0xFFFFFFFF)
_DECLARED_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class MediaError(Exception):
    """One media cell cannot be used; `str(err)` is the reason recorded for its rows."""


@dataclass(frozen=True)
class MediaRef:
    """A resolved media cell: a file, or a member of an uncompressed tar archive."""

    path: Path
    member: str | None = None

    @property
    def key(self) -> str:
        """Identity used to decode a file shared by several rows only once."""
        return f"{self.path}{ARCHIVE_SEPARATOR}{self.member}" if self.member else str(self.path)

    def __str__(self) -> str:
        return self.key


def resolve_ref(value: str, root: Path) -> MediaRef:
    """Resolve a manifest cell against the manifest folder `root`."""
    archive, sep, member = value.partition(ARCHIVE_SEPARATOR)
    path = Path(archive)
    path = path if path.is_absolute() else root / path
    return MediaRef(path, member if sep else None)


# ---- tar shards ---------------------------------------------------------------------------------
class _TarIndex:
    """Member name -> (data offset, size) of one tar file, read once per process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: dict[str, tuple[int, int]] = {}
        with tarfile.open(path, mode="r:") as archive:  # "r:" refuses compressed archives
            for info in archive:
                if info.isfile():
                    self.members[info.name] = (info.offset_data, info.size)

    def read(self, member: str) -> bytes:
        if member not in self.members:
            raise MediaError(f"no member {member!r} in archive {self.path}")
        offset, size = self.members[member]
        # A descriptor per read, not per archive: webdataset sets run to thousands of shards,
        # past the open-file limit, and an evicted index must not close a descriptor in use.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise MediaError(f"archive {self.path} is truncated inside member {member!r}")
        return data


_TAR_INDEXES: OrderedDict[tuple[str, int, int], _TarIndex] = OrderedDict()
_TAR_LOCK = threading.Lock()
TAR_INDEXES_KEPT = 64  # rows are grouped by shard, so a worker needs only the last few


def _tar_index(path: Path) -> _TarIndex:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise MediaError(f"archive not found: {path}") from None
    except OSError as err:
        raise MediaError(f"cannot read archive {path}: {err.strerror or err}") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _TAR_LOCK:  # one indexing pass per archive, even when many threads ask at once
        index = _TAR_INDEXES.get(key)
        if index is not None:
            _TAR_INDEXES.move_to_end(key)
        else:
            try:
                index = _TarIndex(path)
            except tarfile.ReadError as err:
                raise MediaError(f"cannot read {path} as an uncompressed tar archive ({err}); "
                                 f"compressed shards cannot be read by offset") from None
            except OSError as err:
                raise MediaError(f"cannot read archive {path}: {err}") from None
            _TAR_INDEXES[key] = index
            while len(_TAR_INDEXES) > TAR_INDEXES_KEPT:  # memory stays flat in shard count
                _TAR_INDEXES.popitem(last=False)
        return index


def read_bytes(ref: MediaRef) -> bytes:
    """The raw bytes of a media cell."""
    if ref.member is not None:
        return _tar_index(ref.path).read(ref.member)
    try:
        return ref.path.read_bytes()
    except FileNotFoundError:
        raise MediaError(f"file not found: {ref.path}") from None
    except IsADirectoryError:
        raise MediaError(f"unreadable: {ref.path} is a folder, not a file") from None
    except OSError as err:
        raise MediaError(f"unreadable: {ref.path}: {err.strerror or err}") from None


# ---- images -------------------------------------------------------------------------------------
def open_image(ref: MediaRef) -> Image.Image:
    """Decode an image fully into RGB; truncated and corrupt files raise MediaError."""
    data = read_bytes(ref)
    if not data:
        raise MediaError(f"unreadable: {ref} is an empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # force the full decode here, so truncation is seen now
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise MediaError(f"corrupt: {ref} is not a readable image") from None
    except Image.DecompressionBombError as err:
        raise MediaError(f"refused: {ref}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err)
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        raise MediaError(f"{kind}: {ref} cannot be decoded ({text})") from None


# ---- audio --------------------------------------------------------------------------------------
def _declared_shortfall(extra_info: str) -> bool:
    """libsndfile reads a cut WAV/AIFF silently; its log says the data chunk is short."""
    for declared, actual in _DECLARED_SIZE.findall(extra_info):
        if int(declared) not in _STREAMED_SIZES and int(declared) > int(actual):
            return True
    return False


def load_audio(ref: MediaRef, sample_rate: int) -> np.ndarray:
    """Decode WAV/FLAC/OGG/MP3 (whatever libsndfile reads) to mono float32 at `sample_rate`."""
    data = read_bytes(ref)
    if not data:
        raise MediaError(f"unreadable: {ref} is an empty file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            declared = handle.frames
            samples = handle.read(dtype="float32", always_2d=True)
            log = handle.extra_info
            rate = handle.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise MediaError(f"corrupt: {ref} is not readable audio ({err})") from None
    if len(samples) < declared or _declared_shortfall(log):
        raise MediaError(f"truncated: {ref} holds fewer samples than its header declares")
    if len(samples) == 0:
        raise MediaError(f"corrupt: {ref} holds no audio samples")
    if not np.isfinite(samples).all():
        raise MediaError(f"corrupt: {ref} holds non-finite samples")
    return mono_at_rate(samples, rate, sample_rate)


def mono_at_rate(samples: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """(frames,) or (frames, channels) samples at `rate` -> mono float32 at `sample_rate`."""
    samples = np.asarray(samples, dtype=np.float32)
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def centre_crop(wave: np.ndarray, max_samples: int | None) -> np.ndarray:
    """The middle `max_samples` of a long clip: deterministic, so reruns give the same latents."""
    if max_samples is None or len(wave) <= max_samples:
        return wave
    start = (len(wave) - max_samples) // 2
    return wave[start:start + max_samples]
