"""Config dataclasses: each key's type, default, range and allowed values, declared once.

A method, a loss and the training loop each describe the config keys they read as one dataclass
whose fields are made with `param`::

    @dataclass
    class MyConfig:
        width: int = param(8, low=1, high=MAX_DIM, help="hidden width")
        mode: str = param("sum", choices=("sum", "mean"))
        scale: float | None = None          # a plain default: any float, or null

`alignpipe.fit.config.resolve_config` reads these declarations (`config_params`) to check and
type every value a user gives; nothing else repeats a default or a bound. Field types are
``int``, ``float``, ``bool``, ``str``, ``Any``, or ``X | None`` of one of them.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import NoneType, UnionType
from typing import Any

# Bounds on sizes, so a mistyped or hostile config is refused instead of building a model that
# hangs or exhausts memory (blocks: 1000000). Far above anything the papers use.
MAX_DIM = 1 << 20         # a latent or output width
MAX_BLOCKS = 64           # residual blocks per head (FuseMix: 4)
MAX_EXPANSION = 64        # hidden width / input width (FuseMix: 4)
MAX_EPOCHS = 1_000_000

SCALARS = (int, float, bool, str)
_META = "alignpipe"  # the key of a field's metadata that holds its `Param` declaration


@dataclass(frozen=True)
class Range:
    """Bounds of a number; `None` leaves that side open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False   # low itself is outside the range
    high_open: bool = False  # high itself is outside the range

    def problem(self, key: str, value: Any) -> str | None:
        """Why `value` is outside the range (NaN always is), or None when it is inside."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        low, high = self.low, self.high
        inside = value == value and not (
            (low is not None and (value < low or (value == low and self.low_open)))
            or (high is not None and (value > high or (value == high and self.high_open))))
        if inside:
            return None
        lo = f"{'(' if self.low_open or low is None else '['}{'-∞' if low is None else low}"
        hi = f"{'∞' if high is None else high}{')' if self.high_open or high is None else ']'}"
        return f"{key} must be in {lo}, {hi} (got {value})"


@dataclass(frozen=True)
class Param:
    """One config key as a resolver sees it: its declaration plus the field's type."""

    name: str
    kind: type | Any              # int, float, bool, str, or Any
    optional: bool                # null is a valid value
    default: Any
    range: Range | None = None
    choices: tuple | None = None  # the allowed values (besides null when optional)
    note: str = ""                # appended to a range or choice refusal: why the bound is there
    help: str = ""

    def problem(self, value: Any) -> str | None:
        """Why `value` (already of the right type) is out of range or not a choice."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            why = (f"{self.name} must be one of {', '.join(map(str, self.choices))}"
                   f"{' (or null)' if self.optional else ''} (got {value!r})")
        else:
            why = self.range.problem(self.name, value) if self.range else None
        return f"{why}: {self.note}" if why and self.note else why


def param(default: Any, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False, choices: Sequence | None = None,
          note: str = "", help: str = "") -> Any:
    """A dataclass field for a config key: its default, and the values it may take.

    `low`/`high` bound a number (inclusive unless `low_open`/`high_open`); `choices` lists the
    allowed values; `note` says why a bound is there (shown when it refuses); `help` describes
    the key.
    """
    rng = Range(low, high, low_open, high_open) if low is not None or high is not None else None
    return _field(default, {"range": rng, "choices": None if choices is None else tuple(choices),
                            "note": note, "help": help})


def _field(default: Any, declared: dict) -> Any:
    if isinstance(default, (list, dict)):  # a fresh copy per instance, as dataclasses require
        return field(default_factory=lambda: copy.deepcopy(default), metadata={_META: declared})
    return field(default=default, metadata={_META: declared})


def _kind(hint: Any, where: str) -> tuple[Any, bool]:
    """(scalar type or Any, optional) of a field's type hint; other types are refused."""
    if hint is Any or hint in SCALARS:
        return hint, False
    if typing.get_origin(hint) in (typing.Union, UnionType):
        rest = [a for a in typing.get_args(hint) if a is not NoneType]
        if len(rest) == 1 and (rest[0] is Any or rest[0] in SCALARS):
            return rest[0], True
    raise TypeError(f"{where}: config keys are int, float, bool, str, Any or one of them "
                    f"| None, not {hint!r}")


@lru_cache(maxsize=256)
def config_params(cls: type) -> tuple[Param, ...]:
    """The keys a config dataclass declares, in field order."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"a config must be a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: a config key needs a default")
        declared = f.metadata.get(_META, {})
        out.append(Param(f.name, kind, optional or default is None, default, **declared))
    return tuple(out)


def config_defaults(cls: type) -> dict[str, Any]:
    """Each key of a config dataclass with its default, in field order."""
    return {p.name: copy.deepcopy(p.default) for p in config_params(cls)}


def config_from_defaults(name: str, defaults: dict[str, Any]) -> type:
    """A config dataclass whose keys are `defaults`, each typed by its default's type (a default
    of None takes any value); the shorthand behind ``register_method(name, defaults={...})``."""
    fields = []
    for key, value in defaults.items():
        kind = type(value) if type(value) in SCALARS else Any
        fields.append((key, kind, param(value)))
    return dataclasses.make_dataclass(f"{name}_config", fields)


def config_schema(name: str, config: type | None, defaults: dict | None) -> type:
    """The config dataclass a plug-in registers: `config` itself, or one made from `defaults`;
    a field of a type the resolver cannot check is refused here, at registration."""
    if (config is None) == (defaults is None):
        raise TypeError(f"register {name!r}: give exactly one of config= (a dataclass) or "
                        f"defaults= (a mapping of key to default)")
    schema = config if config is not None else config_from_defaults(name, defaults)
    config_params(schema)
    return schema


def compose(name: str, parts: Sequence[type]) -> type:
    """One config dataclass holding the keys of `parts` in order (the first declaration of a
    key wins), each typed as the resolver reads it (``X | None`` for every key null may take)."""
    seen: dict[str, tuple] = {}
    for part in parts:
        for p in config_params(part):
            if p.name not in seen:
                kind = p.kind | None if p.optional and p.kind is not Any else p.kind
                declared = {"range": p.range, "choices": p.choices, "note": p.note,
                            "help": p.help}
                seen[p.name] = (p.name, kind, _field(p.default, declared))
    return dataclasses.make_dataclass(name, list(seen.values()))
