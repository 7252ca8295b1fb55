"""Where an encoder's weights come from, and the hash that records which weights they were.

By default every encoder loads from its hub (timm or Hugging Face). ``--weights PATH`` loads a
local weights file or a directory (``save_pretrained`` layout, or a folder holding one weights
file); ``--weights random`` gives seeded random weights (for timing: random weights cost the
same forward pass as trained ones). The store records the sha256 of whatever was loaded locally.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

from alignpipe.data.manifest import file_sha256
from alignpipe.encoders.registry import (
    EncoderError,
    EncoderSpec,
    installed_copy_package,
    installed_weights_package,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".h5", ".msgpack")
RANDOM = "random"
RANDOM_SEED = 0
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


@dataclass(frozen=True)
class WeightsSource:
    """kind: hub | file | dir | random | test (a test encoder's seeded init)."""

    kind: str
    path: Path | None = None
    sha256: str | None = None
    note: str = ""

    @property
    def local(self) -> bool:
        return self.kind in ("file", "dir")

    def record(self) -> dict:
        """The fields a store's ``encoder`` attr carries about the weights."""
        return {"weights": self.kind, "weights_path": str(self.path) if self.path else None,
                "weights_sha256": self.sha256, **({"weights_note": self.note} if self.note else {})}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = file_sha256(path, block=1 << 22)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file; for a folder, of its weight files' names and hashes."""
    if path.is_file():
        return _file_sha256(path)
    files = weight_files(path)
    if not files:
        raise EncoderError(f"--weights {path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) "
                           f"in this folder")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def installed_copy(model_id: str) -> Path | None:
    """The ``model`` folder of the package registered for `model_id` by
    `register_installed_copy`, when that package is installed."""
    package = installed_copy_package(model_id)
    found = importlib.util.find_spec(package[0]) if package else None
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(list(found.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").exists() else None


def installed_weights_file(spec: EncoderSpec) -> Path | None:
    """The weights file of the package registered for `spec` by `register_installed_weights`,
    when that package is installed."""
    package = installed_weights_package(spec.backend, spec.model_id)
    found = importlib.util.find_spec(package[0]) if package else None
    if found is None or not found.submodule_search_locations:
        return None
    file = Path(list(found.submodule_search_locations)[0]) / package[2]
    return file if file.is_file() else None


def resolve_weights(spec: EncoderSpec, weights: str | Path | None) -> WeightsSource:
    """Decide where `spec`'s weights come from; raises EncoderError for a bad path."""
    if weights is not None and str(weights) == RANDOM:
        return WeightsSource("random", note=f"random init, seed {RANDOM_SEED}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise EncoderError(f"--weights {weights}: no such file or folder")
        kind = "dir" if path.is_dir() else "file"
        return WeightsSource(kind, path.resolve(), weights_sha256(path))
    if spec.test_config is not None:
        return WeightsSource("test", note=f"seeded random init, seed {spec.test_config['seed']}")
    folder = installed_copy(spec.model_id)
    if folder is not None:
        return WeightsSource("dir", folder, weights_sha256(folder),
                             note=f"installed {installed_copy_package(spec.model_id)[1]} package")
    file = installed_weights_file(spec)
    if file is not None:
        pip_name = installed_weights_package(spec.backend, spec.model_id)[1]
        return WeightsSource("file", file.resolve(), weights_sha256(file),
                             note=f"installed {pip_name} package")
    return WeightsSource("hub")
