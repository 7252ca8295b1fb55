"""alignpipe: embed once with frozen encoders, then align and evaluate on cached latents."""

__version__ = "0.1.0"

from alignpipe.errors import AlignpipeError  # noqa: E402
from alignpipe.manifest import Manifest, read_manifest  # noqa: E402
from alignpipe.store import LatentStore, create_store, open_store, store_path  # noqa: E402

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
