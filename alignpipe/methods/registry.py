"""The method registry: `register_method` (a decorator) and the lookups.

Each method module registers itself here on import; the package's ``__init__`` imports them all,
so this module never imports a method back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.methods.base import Method
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method, and the config keys it understands (with defaults)."""

    name: str
    build: Callable[[dict, int, int], Method]
    defaults: dict = field(default_factory=dict)
    trained: bool = True
    description: str = ""


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, *, defaults: dict, trained: bool = True, description: str = ""):
    """Decorator: register ``build(config, dim_a, dim_b) -> Method`` under `name`."""

    def wrap(build):
        METHODS.add(name, MethodSpec(name, build, dict(defaults), trained, description))
        return build

    return wrap


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style wildcard, sorted."""
    return METHODS.names(pattern)


def is_registered(name: str) -> bool:
    return name in METHODS


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise AlignpipeError(f"unknown method {name!r}; registered: {', '.join(list_methods())}")
    return METHODS.get(name)


def create_method(name: str, config: dict, dim_a: int, dim_b: int) -> Method:
    """Build a method from a resolved config (unknown keys are ignored here; fit.py checks)."""
    spec = method_spec(name)
    try:
        return spec.build({**spec.defaults, **config}, dim_a, dim_b)
    except ValueError as err:  # a config value the heads refuse (temperature range, alpha, topk)
        raise AlignpipeError(f"method {name} config: {err}") from None
