"""The method registry: `register_method` (a decorator) and the lookups.

Each method module registers itself here on import; the package's ``__init__`` imports them all,
so this module never imports a method back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignpipe.methods.base import Method
from alignpipe.methods.params import config_defaults, config_schema
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry

Builder = Callable[[dict, int, int], Method]


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method, and the dataclass of the config keys it reads (params.py)."""

    name: str
    build: Builder
    config: type
    trained: bool = True
    description: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's own config keys with their defaults (the loop's keys are fit's)."""
        return config_defaults(self.config)


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, *, config: type | None = None, defaults: dict | None = None,
                    trained: bool = True, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: register ``build(config, dim_a, dim_b) -> Method`` under `name`.

    `config` is the dataclass of the method's own config keys (params.py); `defaults`, a
    mapping of key to default, is shorthand for one whose keys take their default's type.
    `trained` methods also get the training loop's keys (fit/config.py).
    """
    schema = config_schema(name, config, defaults)

    def wrap(build: Builder) -> Builder:
        METHODS.add(name, MethodSpec(name, build, schema, trained, description))
        return build

    return wrap


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style wildcard, sorted."""
    return METHODS.names(pattern)


def is_registered(name: str) -> bool:
    """Whether a method of this name is registered."""
    return name in METHODS


def method_spec(name: str) -> MethodSpec:
    """The registered method `name`, or an AlignpipeError listing the registered ones."""
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
