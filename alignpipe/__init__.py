"""alignpipe: embed once with frozen encoders, then align and evaluate on cached latents.

This is the core's public API, as plain Python calls::

    import alignpipe
    alignpipe.embed("data_manifests/toy/toy.parquet", "test-vit", cache="cache")
    run = alignpipe.fit(image_store, text_store, method="fusemix", out="runs/toy")
    evaluation = alignpipe.evaluate("retrieval", "runs/toy", [image_store, text_store])

Names that need torch (stage one, stage two, evaluation) are imported on first use, so
``import alignpipe`` stays light; none of them loads the app (typer, rich, matplotlib).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from alignpipe._version import __version__
from alignpipe.data.manifest import Manifest, read_manifest
from alignpipe.data.store import LatentStore, create_store, open_store, store_path
from alignpipe.util.errors import AlignpipeError

#: Public name -> the core module that defines it (imported when the name is first used).
_LAZY = {
    "embed": "alignpipe.embed", "embed_status": "alignpipe.embed",
    "EncoderSpec": "alignpipe.encoders", "load_encoder": "alignpipe.encoders",
    "list_encoders": "alignpipe.encoders",
    "fit": "alignpipe.fit", "load_run": "alignpipe.fit", "FitCallback": "alignpipe.fit",
    "list_methods": "alignpipe.methods", "list_losses": "alignpipe.methods",
    "evaluate": "alignpipe.evaluate", "list_evaluators": "alignpipe.evaluate",
    "similarity": "alignpipe.evaluate.similarity",
    "list_builders": "alignpipe.data.builders",
    "load_model": "alignpipe.model", "export_model": "alignpipe.model",
}

__all__ = ["AlignpipeError", "LatentStore", "Manifest", "__version__", "create_store",
           "open_store", "read_manifest", "store_path", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
