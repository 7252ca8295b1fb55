"""The method registry: `register_method` (a decorator) and the lookups.

Each method module registers itself here on import; the package's ``__init__`` imports them all,
so this module never imports a method back.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.errors import AlignpipeError
from alignpipe.methods.base import Method


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
