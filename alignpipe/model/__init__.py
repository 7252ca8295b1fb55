"""A fitted run as a model on raw inputs: `load_model`, zero-shot classification, export.

>>> model = load_model("runs/toy/image-text")          # or an `alignpipe export` folder
>>> model.zero_shot(["red circle", "blue square"], "photo")
>>> model.classify(["a.png", "b.jpg"], k=1)
>>> model.encode("text", ["a red circle"])              # normalised, in the shared space
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignpipe.model.aligned import (
    AlignedModel,
    Encodings,
    ModelError,
    Prediction,
    ZeroShotClassifier,
)
from alignpipe.model.inputs import InputError
from alignpipe.model.load import load_model

if TYPE_CHECKING:
    from collections.abc import Callable

    # What `__getattr__` loads on first use, for type checkers (never imported here at run time).
    from alignpipe.model.export import export_model, push_to_hub
    from alignpipe.model.search import search_store

__all__ = ["AlignedModel", "Encodings", "InputError", "ModelError", "Prediction",
           "ZeroShotClassifier", "export_model", "load_model", "push_to_hub", "search_store"]


def __getattr__(name: str) -> Callable[..., object]:
    if name in ("export_model", "push_to_hub"):
        from alignpipe.model import export

        return getattr(export, name)
    if name == "search_store":
        from alignpipe.model.search import search_store

        return search_store
    raise AttributeError(f"module 'alignpipe.model' has no attribute {name!r}")
