"""alignpipe: embed once with frozen encoders, then align and evaluate on cached latents."""

from alignpipe._version import __version__
from alignpipe.errors import AlignpipeError
from alignpipe.manifest import Manifest, read_manifest
from alignpipe.store import LatentStore, create_store, open_store, store_path

__all__ = [
    "AlignpipeError",
    "LatentStore",
    "Manifest",
    "__version__",
    "create_store",
    "open_store",
    "read_manifest",
    "store_path",
]
