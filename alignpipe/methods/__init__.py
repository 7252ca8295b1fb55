"""Alignment methods: a registry of small objects that fit on paired latents and encode a side.

A method is built by name from its resolved config and the two latent dims::

    method = create_method("fusemix", config, dim_a=1536, dim_b=1024)
    method.fit(train, val, loop=loop)       # trained methods need fit.py's loop; asif does not
    z = method.encode("a", latents)         # normalised encodings of side a

Methods are composed from heads (heads.py), a loss (losses.py) and, for FuseMix, a batch
transform (fusemix.py); none inherits from another. ``list_methods("*")`` takes wildcards.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.errors import AlignpipeError
from alignpipe.methods.base import Method, Pairs


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method, and the config keys it understands (with defaults)."""

    name: str
    build: Callable[[dict, int, int], Method]
    defaults: dict = field(default_factory=dict)
    trained: bool = True
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, *, defaults: dict, trained: bool = True, description: str = ""):
    """Decorator: register ``build(config, dim_a, dim_b) -> Method`` under `name`."""

    def wrap(build):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, build, dict(defaults), trained, description)
        return build

    return wrap


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style wildcard, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise AlignpipeError(f"unknown method {name!r}; registered: {', '.join(list_methods())}")
    return _REGISTRY[name]


def create_method(name: str, config: dict, dim_a: int, dim_b: int) -> Method:
    """Build a method from a resolved config (unknown keys are ignored here; fit.py checks)."""
    spec = method_spec(name)
    try:
        return spec.build({**spec.defaults, **config}, dim_a, dim_b)
    except ValueError as err:  # a config value the heads refuse (temperature range, alpha, topk)
        raise AlignpipeError(f"method {name} config: {err}") from None


# Registration happens on import; keep these last so the decorator exists.
from alignpipe.methods import asif, fusemix, linear, mlp  # noqa: E402,F401

__all__ = ["Method", "MethodSpec", "Pairs", "create_method", "is_registered", "list_methods",
           "method_spec", "register_method"]
