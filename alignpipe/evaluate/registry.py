"""The evaluator registry: `register_evaluator` (a decorator), `list_evaluators` and `evaluate`.

An evaluator computes and returns an `Evaluation` (the numbers, plus the tables and figure its
report shows); it writes nothing. `evaluate(kind, ...)` runs one by name. Writing is the app's
job: `alignpipe.app.results.run_evaluation` picks where a result goes and writes it, and the
CLI's ``alignpipe eval <kind>`` and a pipeline's ``eval:`` entries both come through it.

Each evaluator module registers itself on import; the package's ``__init__`` imports them all, so
this module never imports an evaluator back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.util.errors import AlignpipeError
from alignpipe.util.registry import Registry

if TYPE_CHECKING:
    from alignpipe.data.store import LatentStore

#: Options every evaluator takes, besides its stores and its own options.
COMMON_OPTIONS = ("split", "identity", "device", "manifest", "allow_partial")


@dataclass
class Table:
    """A markdown table of a report, under an optional ``## heading``."""

    header: list[str]
    rows: list[list]
    heading: str | None = None


@dataclass
class Figure:
    """A plot of a report: `kind` names a drawing in `alignpipe.app.results.FIGURES`
    (``recall_curves``: data ``{"curves": {name: [...]}}``; ``confusion``: data
    ``{"matrix": array, "names": [...]}``)."""

    kind: str
    data: dict
    title: str


@dataclass
class Evaluation:
    """What an evaluator computed: the result (the JSON, less where it went) and its report.

    `stem` is the default file name (without .json); `produced_by(folder)` says what made the
    result, with paths relative to the folder the result is written to.
    """

    result: dict
    stem: str
    produced_by: Callable[[Path], dict]
    title: str
    summary: str
    tables: list[Table] = field(default_factory=list)
    figure: Figure | None = None


@dataclass(frozen=True)
class EvaluatorSpec:
    """An evaluator: `compute(run, *stores, split=, identity=, device=, manifest=,
    allow_partial=, **options) -> Evaluation`, the names of its store arguments (as a pipeline
    ``eval:`` entry names them) and its own options with their defaults."""

    name: str
    compute: Callable[..., Evaluation]
    stores: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


EVALUATORS: Registry[EvaluatorSpec] = Registry("evaluator")


def register_evaluator(name: str, *, stores: tuple[str, ...], options: dict | None = None,
                       description: str = "") -> Callable:
    """Decorator: register ``compute(run, *stores, **options) -> Evaluation`` as kind `name`.

    `stores` names the store arguments in order (``("a", "b")``); `options` maps each option
    of this kind (beyond `COMMON_OPTIONS`) to its default.
    """

    def wrap(compute: Callable[..., Evaluation]) -> Callable[..., Evaluation]:
        EVALUATORS.add(name, EvaluatorSpec(name, compute, tuple(stores), dict(options or {}),
                                           description))
        return compute

    return wrap


def list_evaluators(pattern: str = "*") -> list[str]:
    """Registered evaluator kinds matching a shell-style wildcard, sorted."""
    return EVALUATORS.names(pattern)


def evaluator_spec(kind: str) -> EvaluatorSpec:
    """The evaluator registered as `kind`, or an AlignpipeError naming the known kinds."""
    return EVALUATORS.get(kind)


def evaluate(kind: str, run: str | Path | None, stores: list[str | Path | LatentStore],
             **options: Any) -> Evaluation:
    """Run the evaluator `kind` on `stores` (through the run's heads, or as they are with
    ``identity=True``) and return its `Evaluation`; nothing is written.

    Options the kind does not take are refused by name. `alignpipe.app.results.run_evaluation`
    is the same call followed by writing the result's JSON, markdown and PNG.
    """
    spec = evaluator_spec(kind)
    if len(stores) != len(spec.stores):
        raise AlignpipeError(f"eval {kind}: needs {len(spec.stores)} stores "
                             f"({', '.join(spec.stores)}), got {len(stores)}")
    unknown = sorted(set(options) - set(COMMON_OPTIONS) - set(spec.options))
    if unknown:
        raise AlignpipeError(f"eval {kind}: unknown option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join([*COMMON_OPTIONS, *spec.options])}")
    return spec.compute(run, *stores, **options)


def eval_options() -> tuple[str, ...]:
    """Every key a pipeline ``eval:`` entry may hold: kind, run, each kind's stores, split,
    identity, then each kind's own options (in kind order)."""
    stores: dict[str, None] = {}
    own: dict[str, None] = {}
    for kind in list_evaluators():
        spec = evaluator_spec(kind)
        stores.update(dict.fromkeys(spec.stores))
        own.update(dict.fromkeys(spec.options))
    return ("kind", "run", *stores, "split", "identity", *own)
