"""Alignment methods: a registry of small objects that fit on paired latents and encode a side.

A method is built by name from its resolved config and the two latent dims::

    method = create_method("fusemix", config, dim_a=1536, dim_b=1024)
    method.fit(train, val, loop=loop)       # trained methods need fit.py's loop; asif does not
    z = method.encode("a", latents)         # normalised encodings of side a

Methods are composed from heads (heads.py), a loss (losses.py) and, for FuseMix, a batch
transform (fusemix.py); none inherits from another. ``list_methods("*")`` takes wildcards.
"""

from __future__ import annotations

# Each method module registers itself with the registry on import.
from alignpipe.methods import asif, fusemix, linear, mlp  # noqa: F401
from alignpipe.methods.base import Method, Pairs
from alignpipe.methods.registry import (
    MethodSpec,
    create_method,
    is_registered,
    list_methods,
    method_spec,
    register_method,
)

__all__ = ["Method", "MethodSpec", "Pairs", "create_method", "is_registered", "list_methods",
           "method_spec", "register_method"]
