"""The manifest-builder registry: each builder declares its options once, here, and both
``alignpipe manifest <kind>`` (cli.py) and a pipeline's ``make: {kind: ...}`` block
(planning.py) are generated from that declaration.

A builder is one function taking its declared options as keywords (``out`` among them)::

    @register_builder("mine", options=(Option("source", Path, help="...", positional=True,
                                              exists=True), OUT, *CHECK_OPTIONS),
                      source="source")
    def _mine(source: Path, out: Path, check_files: bool = True, skip_missing: bool = False,
              check: str | None = None) -> BuildResult:
        \"\"\"One-line help of `alignpipe manifest mine`.\"\"\"
        return build_mine(source, out, check=check_of(check_files, skip_missing, check))

Adding a builder is that module plus one import line in ``alignpipe/data/builders/__init__.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alignpipe.data.builders._common import CHECK_POLICIES, SplitPlan, check_policy
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry

REQUIRED: Any = inspect.Parameter.empty  # the default of an option that must be given
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Option:
    """One option of a builder: ``--name-with-dashes`` (or an argument) on the command line,
    ``name`` in a ``make:`` block and the keyword the builder function receives."""

    name: str
    type: type = str
    default: Any = REQUIRED
    help: str = ""
    positional: bool = False  # a command-line argument (in declaration order), not --option
    cli: bool = True  # on the command line
    make: bool = True  # accepted in a make: block
    exists: bool = False  # a path a make: block needs on disk before anything runs
    aliases: tuple[str, ...] = ()  # other make: keys meaning the same option (older names)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class BuilderSpec:
    """How to build one manifest kind, and the options it takes."""

    kind: str
    build: Callable[..., Any]
    options: tuple[Option, ...]
    help: str = ""
    source: str | None = None  # the option naming the main input (a make: block must give it)
    where_to_get: str = ""  # where a missing source comes from, said when it is missing
    cli: bool = True  # also an `alignpipe manifest <kind>` command
    writes_folder: bool = False  # `out` is a folder holding the manifest (toy), not the manifest

    def cli_options(self) -> list[Option]:
        return [o for o in self.options if o.cli]

    def make_options(self) -> dict[str, Option]:
        """make: key -> option, aliases included."""
        keys: dict[str, Option] = {}
        for option in self.options:
            if option.make:
                keys.update({key: option for key in (option.name, *option.aliases)})
        return keys

    def run(self, values: dict[str, Any], *, progress: bool = False) -> Any:
        """Call the builder with `values` (declared names) and the defaults of the rest."""
        kwargs = {o.name: o.default for o in self.options if not o.required}
        kwargs.update(values)
        missing = [o.name for o in self.options if o.required and o.name not in kwargs]
        if missing:
            raise AlignpipeError(f"make {self.kind} needs {', '.join(missing)}")
        if "progress" in inspect.signature(self.build).parameters:
            kwargs["progress"] = progress
        return self.build(**kwargs)


BUILDERS: Registry[BuilderSpec] = Registry("manifest builder")


def register_builder(kind: str, *, options: tuple[Option, ...] | list[Option],
                     help: str | None = None, source: str | None = None, where_to_get: str = "",
                     cli: bool = True, writes_folder: bool = False) -> Callable[[F], F]:
    """Decorator: register ``build(**options)`` as the builder of `kind` (help: its docstring)."""

    def wrap(build: F) -> F:
        names = [o.name for o in options]
        if len(set(names)) != len(names) or "out" not in names:
            raise ValueError(f"builder {kind!r}: options must be unique and include 'out'")
        BUILDERS.add(kind, BuilderSpec(kind, build, tuple(options),
                                       help if help is not None else inspect.getdoc(build) or "",
                                       source, where_to_get, cli, writes_folder))
        return build

    return wrap


def list_builders(pattern: str = "*") -> list[str]:
    """Registered builder kinds matching a shell-style wildcard, sorted."""
    return BUILDERS.names(pattern)


def builder_spec(kind: str) -> BuilderSpec:
    return BUILDERS.get(kind)


# ---- options several builders share -------------------------------------------------------------
OUT = Option("out", Path, help="Manifest to write (.parquet).", positional=True, make=False)
CHECK_FILES = Option("check_files", bool, True,
                     "Verify media files exist; missing ones are reported by name and count.")
SKIP_MISSING = Option("skip_missing", bool, False, "Leave rows with missing media out (and "
                                                   "report how many) instead of refusing.")
CHECK = Option("check", str, None, f"make: only: {', '.join(CHECK_POLICIES)} (instead of "
                                   "check_files/skip_missing).", cli=False)
CHECK_OPTIONS = (CHECK_FILES, SKIP_MISSING, CHECK)
SKIP_INCOMPLETE = Option("skip_incomplete", bool, False, "Leave samples without a caption (or "
                                                         "image) out instead of refusing.")
SPLIT = Option("split", str, None, "Split for every row: train, val or test (default: train).")
SPLIT_FRACTIONS = Option("split_fractions", str, None,
                         "Assign seeded splits instead: train,val,test fractions summing to 1, "
                         "e.g. 0.8,0.1,0.1. Rows sharing an image or audio file stay together.")
SPLIT_SEED = Option("split_seed", int, 0,
                    "Seed of --split-fractions: same seed, same split, whatever the row order.")


def check_of(check_files: bool, skip_missing: bool, check: str | None = None) -> str:
    """The check policy of the options: ``check`` (make: only) wins over the two flags."""
    if check is None:
        return check_policy(check_files, skip_missing)
    if check not in CHECK_POLICIES:  # a typo must not fall through to "skip" and drop rows
        raise AlignpipeError(f"make: check {check!r} is not one of {', '.join(CHECK_POLICIES)}")
    return check


def split_plan_of(fractions: str | None, seed: int, override: bool = False) -> SplitPlan | None:
    return SplitPlan.parse(fractions, seed, override) if fractions is not None else None
