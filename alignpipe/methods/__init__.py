"""Alignment methods: a registry of small objects that fit on paired latents and encode a side.

A method is built by name from its resolved config and the two latent dims::

    method = create_method("fusemix", config, dim_a=1536, dim_b=1024)
    method.fit(train, val, loop=loop)       # trained methods need fit.py's loop; asif does not
    z = method.encode("a", latents)         # normalised encodings of side a

Methods are composed from heads (heads.py), a registered loss (losses.py, chosen by the config's
``loss`` key) and, for FuseMix, a batch transform (fusemix.py); none inherits from another. The
training loop uses a trained method only through `TrainedMethod` (base.py).
``list_methods("*")`` and ``list_losses("*")`` take wildcards.
"""

from __future__ import annotations

# Each method module registers itself with the registry on import.
from alignpipe.methods import asif, fusemix, linear, mlp  # noqa: F401
from alignpipe.methods.base import Method, Pairs, TrainedMethod
from alignpipe.methods.losses import Loss, build_loss, list_losses, loss_spec, register_loss
from alignpipe.methods.registry import (
    MethodSpec,
    create_method,
    is_registered,
    list_methods,
    method_spec,
    register_method,
)

__all__ = ["Loss", "Method", "MethodSpec", "Pairs", "TrainedMethod", "build_loss",
           "create_method", "is_registered", "list_losses", "list_methods", "loss_spec",
           "method_spec", "register_loss", "register_method"]
