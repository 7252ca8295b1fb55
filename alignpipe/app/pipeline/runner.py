"""`alignpipe run`: a YAML plan over make-data → embed → fit → eval, reusing the cache.

A pipeline file has these sections (see pipelines/toy.yaml for a full example)::

    name: toy                      # run folder: <runs>/<name>/
    cache: cache                   # store root
    runs: runs                     # run root
    inputs:                        # environment variables the file uses, and how to get them
      IMAGENET_VAL: "ImageNet val images in class subfolders (image-net.org)"
    data:                          # id -> manifest, and how to make it when it is missing
      toy: {manifest: data_manifests/toy/toy.parquet, make: {kind: toy, rows: 600}}
    embed:                         # id -> one store: a manifest through one encoder
      toy-image: {data: toy, encoder: test-vit}
    fit:                           # id -> one run on two stores (or one per listed method)
      image-text: {method: fusemix, a: toy-image, b: toy-text, set: {epochs: 20}}
      compare: {method: [fusemix, mlp], a: toy-image, b: toy-text,
                config: "pipelines/fit/{method}.yaml", set: {epochs: 20, mlp: {dropout: 0.1}}}
    eval:                          # a list of scores
      - {kind: zeroshot, run: image-text, query: toy-image, prompts: prompts-text}
      - {kind: retrieval, run: image-text, a: toy-image, b: toy-text, split: test}
    similarity: {stores: [toy-image, toy-text]}
    x-shared: &shared {epochs: 40}     # any `x-` key: a place for YAML anchors, ignored
    reference:                     # the papers' numbers, printed beside ours
      - {eval: 0, metric: top1, value: 76.0, source: "freeze-align (CVPR 2025)"}

Strings may use ``${VAR}`` or ``${VAR:-default}``. ``--set`` takes dotted keys into this tree
(``fit.image-text.method=mlp``, ``eval.0.split=val``, ``data.imagenet.make.source=/data``);
its values are read as YAML, like the file's (``null``, ``5``, ``[fusemix, mlp]``), and a key
the pipeline does not have or allow is refused, never silently ignored. Each step is skipped
when the cache already holds its result with the same spec; a fit whose spec changed replaces
its run.

A fit step's run folder is ``<runs>/<name>/<fit id>/``. A step may list several methods
(``method: [fusemix, mlp]``): each gets ``<runs>/<name>/<fit id>-<method>/``, every eval that
names the step scores each of them, and the report puts them side by side. Its ``config`` is
then a mapping of method to file, or one path with ``{method}`` in it; ``set:`` keys apply to
every method, and ``set: {mlp: {...}}`` to one.

Every YAML here is read with `alignpipe.util.yamlsafe.load_yaml` (aliases bounded); the pipeline
name, fit ids and ``dataset`` names must be plain folder names.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignpipe.app.pipeline.curate_step import fit_selections, run_curate_steps
from alignpipe.app.pipeline.planning import did_you_mean as _close
from alignpipe.app.pipeline.planning import make_option_problems
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import atomic_write_text
from alignpipe.util.names import plain_name_problem
from alignpipe.util.yamlsafe import load_yaml

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SECTIONS = ("name", "cache", "runs", "inputs", "data", "embed", "curate", "fit", "eval",
            "similarity", "reference", "device")
EMBED_OPTIONS = ("column", "weights", "image_size", "pooling", "dtype", "latent_dtype",
                 "batch_size", "workers", "unit_rows", "device", "max_failure_rate", "dataset")
FIT_OPTIONS = ("method", "a", "b", "config", "set", "select", "also")
SIMILARITY_OPTIONS = ("stores", "sample", "k", "seed")
REFERENCE_OPTIONS = ("eval", "metric", "value", "source")


class PipelineError(AlignpipeError):
    """The pipeline file is malformed, an input is missing, or a step failed."""


@dataclass
class StepRecord:
    stage: str
    name: str
    status: str  # "cached" | "ran" | "would run" | "cached (dry run)"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class PipelineResult:
    name: str
    folder: Path
    steps: list[StepRecord] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    similarity: dict | None = None
    report: Path | None = None
    runs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "folder": str(self.folder),
                "steps": [s.__dict__ for s in self.steps], "runs": self.runs,
                "evals": self.evals, "similarity": self.similarity}


# ---- loading ------------------------------------------------------------------------------------
def _interpolate(value: Any) -> Any:
    if isinstance(value, str):
        def sub(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ and os.environ[name] != "":
                return os.environ[name]
            if default is not None:
                return default
            return match.group(0)  # left in place; reported only where a step needs it

        return ENV_PATTERN.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    return value


def _unshared(value: Any) -> Any:
    """A copy in which no two places share an object: YAML anchors (``*name``) alias one dict,
    and an override of one step must not change the others."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


_ANY = "*"  # any key here; the value is checked where the step uses it (check_plan)
_STEP_SCHEMA = {
    "data": {"manifest": None, "make": {_ANY: None}},
    "embed": {key: None for key in ("data", "encoder", *EMBED_OPTIONS)},
    "fit": {"method": None, "a": None, "b": None, "config": {_ANY: None},
            "set": {_ANY: {_ANY: None}}, "select": None, "also": None},
    "curate": {_ANY: None},  # options checked by pipeline/curate_step.py
}
_LIST_SCHEMA = {  # each list section's keys; eval's come from the evaluator registry
    "eval": lambda: dict.fromkeys(_eval_options()),
    "reference": lambda: dict.fromkeys(REFERENCE_OPTIONS),
}
_TOP_SCHEMA = {"name": None, "cache": None, "runs": None, "device": None,
               "inputs": {_ANY: None}, "similarity": {key: None for key in SIMILARITY_OPTIONS}}


def _eval_options() -> tuple[str, ...]:
    """The keys an ``eval:`` entry may hold: kind, run, every evaluator's stores and options."""
    from alignpipe.evaluate import eval_options

    return eval_options()


def _override_error(dotted: str, why: str) -> PipelineError:
    return PipelineError(f"--set {dotted}: {why}")


def _config_key_hint(step: object, sid: str, key: str) -> str:
    """For ``fit.<id>.<key>``: point a fit config key (or a typo of one) at ``set:``."""
    from alignpipe import methods
    from alignpipe.fit.config import default_config

    known: set[str] = set()
    for method in fit_methods(step if isinstance(step, dict) else {}):
        if methods.is_registered(method):
            known |= set(default_config(method))
    if key in known:
        return f"; fit config keys go under set: fit.{sid}.set.{key}"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean fit.{sid}.set.{close[0]}?" if close else ""


def _check_override(plan: dict, dotted: str) -> None:
    """Refuse an override that names no key the pipeline has or its schema allows."""
    keys = dotted.split(".")
    if any(k == "" for k in keys):
        raise PipelineError(f"--set {dotted}: empty key")
    section = keys[0]
    if section.startswith("x-"):
        raise PipelineError(f"--set {dotted}: `x-` keys only hold YAML anchors, already copied "
                            f"where they are used; set the key there instead (e.g. "
                            f"fit.<id>.set.<key>)")
    if section in _STEP_SCHEMA:
        if len(keys) == 1:
            raise PipelineError(f"--set {dotted}: name a step and a key, e.g. "
                                f"{section}.<id>.<key>")
        steps = plan.get(section) or {}
        if keys[1] not in steps:
            raise _override_error(dotted, f"no {section} step {keys[1]!r}"
                                  + _close(keys[1], steps)
                                  + f" (steps: {', '.join(map(str, steps)) or 'none'})")
        schema, node, start = _STEP_SCHEMA[section], steps[keys[1]], 2
    elif section in _LIST_SCHEMA:
        entries = plan.get(section) or []
        if len(keys) == 1 or not keys[1].isdigit() or int(keys[1]) >= len(entries):
            raise PipelineError(f"--set {dotted}: {keys[1] if len(keys) > 1 else ''!r} is not "
                                f"an index of a list of {len(entries)} entries")
        schema, node, start = _LIST_SCHEMA[section](), entries[int(keys[1])], 2
    elif section in _TOP_SCHEMA:
        schema, node, start = _TOP_SCHEMA[section], plan.get(section), 1
    else:
        raise PipelineError(f"--set {dotted}: unknown section {section!r}"
                            + _close(section, SECTIONS) + f"; sections: {', '.join(SECTIONS)}")
    for i in range(start, len(keys)):
        key = keys[i]
        if schema is None:  # a value: only an existing list or mapping inside it may be entered
            inside = ((isinstance(node, dict) and key in node)
                      or (isinstance(node, list) and key.isdigit() and int(key) < len(node)))
            if not inside:
                raise _override_error(dotted, f"{'.'.join(keys[:i])} holds a value "
                                      f"with no key {key!r}")
            node = node[key] if isinstance(node, dict) else node[int(key)]
            continue
        if key not in schema and _ANY not in schema:
            hint = _close(key, schema)
            if section == "fit" and i == 2 and not hint:
                hint = _config_key_hint(plan["fit"][keys[1]], keys[1], key)
            raise _override_error(dotted, f"unknown key {key!r}{hint} (valid keys: "
                                  f"{', '.join(schema)})")
        schema = schema.get(key, schema.get(_ANY))
        node = node.get(key) if isinstance(node, dict) else None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise PipelineError(f"--set {dotted}: {key!r} is not an index of a list of "
                                    f"{len(node)} entries")
            key = int(key)
        elif not isinstance(node, dict):
            raise PipelineError(f"--set {dotted}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and (key not in node or node[key] is None):
                node[key] = {}
            node = node[key]


def override_value(raw: Any, key: str = "value") -> Any:
    """A ``--set`` value as YAML reads it (``null`` → None, ``5`` → 5, ``[a, b]`` → a list),
    so that ``--set k=v`` and ``k: v`` in the file give the same value; non-strings pass."""
    if not isinstance(raw, str):
        return raw
    return load_yaml(raw, f"--set {key}") if raw != "" else ""


def load_pipeline(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a pipeline file, apply ``--set`` overrides, fill ``${VAR}`` where it is set."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: pipeline file not found")
    plan = load_yaml(path)
    if not isinstance(plan, dict):
        raise PipelineError(f"{path}: a pipeline file is a mapping with sections "
                            f"{', '.join(SECTIONS)}")
    # `x-` keys hold YAML anchors shared by steps (as in docker compose); the runner ignores them
    plan = _unshared({k: v for k, v in plan.items() if not str(k).startswith("x-")})
    unknown = sorted(set(plan) - set(SECTIONS))
    if unknown:
        raise PipelineError(f"{path}: unknown section(s) {', '.join(map(str, unknown))}; "
                            f"allowed: {', '.join(SECTIONS)}")
    for key, raw in (overrides or {}).items():
        _check_override(plan, key)
        _set_dotted(plan, key, override_value(raw, key))
    plan = _interpolate(plan)
    plan.setdefault("name", path.stem)
    plan.setdefault("cache", "cache")
    plan.setdefault("runs", "runs")
    for section in ("data", "embed", "curate", "fit", "inputs"):
        plan[section] = plan.get(section) or {}
        if not isinstance(plan[section], dict):
            raise PipelineError(f"{path}: section {section!r} must map ids to steps")
    for section in ("eval", "reference"):
        plan[section] = plan.get(section) or []
        if not isinstance(plan[section], list):
            raise PipelineError(f"{path}: section {section!r} must be a list")
    plan["_file"] = str(path)
    return plan


# ---- fit steps: one run per method ---------------------------------------------------------------
@dataclass(frozen=True)
class FitRun:
    """One run of a fit step: the step's only method, or one of the methods it lists."""

    step: str             # the fit id that evals name in `run:`
    method: str
    folder: str           # under <runs>/<name>/: the fit id, or <fit id>-<method> for a list
    config: str | None    # the fit config file for this method
    overrides: dict       # the step's `set:` for this method, values as YAML typed them


def fit_methods(step: dict) -> list[str]:
    """``method: fusemix`` or ``method: [fusemix, mlp]``, as a list."""
    method = step.get("method")
    return [str(m) for m in method] if isinstance(method, list) else [str(method)]


def _config_for(step: dict, method: str) -> str | None:
    config = step.get("config")
    if isinstance(config, dict):
        config = config.get(method)
    return None if config is None else str(config).replace("{method}", method)


def _fit_overrides(step: dict, method: str) -> dict:
    """The step's `set:` for one method: the common keys plus its own ``set: {mlp: {...}}``."""
    values = step.get("set") or {}
    own = {str(k) for k, v in values.items() if str(k) in fit_methods(step) and isinstance(v, dict)}
    shared = {str(k): v for k, v in values.items() if str(k) not in own}
    mine = values.get(method) if method in own else {}
    return {**shared, **{str(k): v for k, v in mine.items()}}


def fit_runs(plan: dict, sid: str) -> list[FitRun]:
    step = plan["fit"][sid]
    several = isinstance(step.get("method"), list)
    return [FitRun(str(sid), method, f"{sid}-{method}" if several else str(sid),
                   _config_for(step, method), _fit_overrides(step, method))
            for method in fit_methods(step)]


def _fit_step_problems(sid: str, step: dict, plan: dict) -> list[str]:
    """Options, methods, config files and `set:` keys of one fit step, checked without data."""
    from alignpipe import methods
    from alignpipe.fit.config import default_config, resolve_config

    where = f"fit.{sid}"
    problems = [p for p in [plain_name_problem(str(sid), f"{where}: the fit id")] if p]
    references = []
    if step.get("method") is None:
        problems.append(f"{where}: needs a method (see `alignpipe fit --list-methods`), or a "
                        f"list of methods")
        return problems
    extra = sorted(set(map(str, step)) - set(FIT_OPTIONS))
    if extra:
        problems.append(f"{where}: unknown option(s) {', '.join(extra)}"
                        + _close(extra[0], FIT_OPTIONS)
                        + f"; valid: {', '.join(FIT_OPTIONS)} (config keys go under set:)")
    for side in ("a", "b"):
        if step.get(side) not in plan["embed"]:
            references.append(f"{where}: {side} {step.get(side)!r} is not an embed step")
    also = step.get("also") or []
    if not isinstance(also, list) or not all(isinstance(p, dict) and set(p) == {"a", "b"}
                                             for p in also):
        problems.append(f"{where}: also is a list of {{a: EMBED_ID, b: EMBED_ID}} pairs "
                        f"(more training stores of other manifests), got {also!r}")
    else:
        references += [f"{where}: also {side} {pair[side]!r} is not an embed step"
                       for pair in also for side in ("a", "b")
                       if pair[side] not in plan["embed"]]
    method = step.get("method")
    names = fit_methods(step)
    if isinstance(method, list) and (not method or len(set(names)) != len(names)):
        problems.append(f"{where}: method lists no method or one twice: {method!r}")
    unknown = [m for m in names if not methods.is_registered(m)]
    for name in unknown:
        problems.append(f"{where}: unknown method {name!r} (see `alignpipe fit --list-methods`)")
    config, values = step.get("config"), step.get("set")
    if config is not None and not isinstance(config, (str, dict)):
        problems.append(f"{where}: config is a file, or a mapping of method to file")
    elif isinstance(config, dict) and set(map(str, config)) - set(names):
        problems.append(f"{where}: config names method(s) "
                        f"{', '.join(sorted(set(map(str, config)) - set(names)))} the step "
                        f"does not list")
    if values is not None and not isinstance(values, dict):
        problems.append(f"{where}: set must be a mapping of fit config keys, got {values!r}")
    if problems or unknown:
        return problems + references
    problems += references
    for run in fit_runs(plan, sid):
        label = f"{where}" + (f" ({run.method})" if len(names) > 1 else "")
        known = default_config(run.method)
        wrong = [k for k in run.overrides if k not in known]
        for key in wrong:
            problems.append(f"{label}: set: unknown key {key!r} for method {run.method}"
                            + _close(key, known) + f" (known keys: {', '.join(sorted(known))})")
        if wrong or (run.config and (_unset(run.config) or not Path(run.config).exists())):
            if run.config and not _unset(run.config) and not Path(run.config).exists():
                problems.append(f"{label}: config file {run.config} not found")
            continue
        try:
            resolve_config(run.method, run.config, run.overrides)
        except AlignpipeError as err:
            hint = (" (give config as {method: file}, or a path with {method} in it)"
                    if len(names) > 1 and isinstance(config, str) else "")
            problems.append(f"{label}: {err}{hint}")
    return problems


# ---- checking -----------------------------------------------------------------------------------
def check_plan(plan: dict) -> list[str]:
    """Structural problems: unknown references, unregistered encoders and methods.

    Needs no data, so it also checks pipelines whose datasets are not on this machine.
    """
    from alignpipe import encoders

    name = plan.get("name")
    problems = [p for p in [plain_name_problem(
        str(name) if isinstance(name, (int, float)) else name, "name")] if p]
    for sid, step in plan["data"].items():
        if not isinstance(step, dict) or "manifest" not in step:
            problems.append(f"data.{sid}: needs a 'manifest' path")
            continue
        if step.get("make") is not None:
            problems += [f"data.{sid}: {p}" for p in make_option_problems(step["make"])]
    for sid, step in plan["embed"].items():
        if not isinstance(step, dict):
            problems.append(f"embed.{sid}: must be a mapping")
            continue
        if step.get("data") not in plan["data"]:
            problems.append(f"embed.{sid}: data {step.get('data')!r} is not in the data section")
        if not step.get("encoder"):
            problems.append(f"embed.{sid}: needs an 'encoder'")
        elif not encoders.is_registered(str(step["encoder"])):
            problems.append(f"embed.{sid}: unknown encoder {step['encoder']!r} (see "
                            f"`alignpipe embed --list-encoders`)")
        extra = sorted(set(step) - {"data", "encoder", *EMBED_OPTIONS})
        if extra:
            problems.append(f"embed.{sid}: unknown option(s) {', '.join(extra)}"
                            + _close(extra[0], EMBED_OPTIONS))
        if "dataset" in step:
            problems += [p for p in [plain_name_problem(step["dataset"],
                                                        f"embed.{sid}: dataset")] if p]
    folders: dict[str, str] = {}
    for sid, step in plan["fit"].items():
        if not isinstance(step, dict):
            problems.append(f"fit.{sid}: must be a mapping")
            continue
        step_problems = _fit_step_problems(sid, step, plan)
        problems += step_problems
        if step_problems:
            continue
        for run in fit_runs(plan, sid):
            if run.folder in folders:
                problems.append(f"fit.{sid}: its run folder {run.folder} is also the folder of "
                                f"fit.{folders[run.folder]}; rename one of the steps")
            folders[run.folder] = sid
    from alignpipe.app.pipeline.curate_step import curate_problems

    problems += curate_problems(plan)
    if plan["eval"]:
        from alignpipe.evaluate import evaluator_spec, list_evaluators

        kinds, eval_options = list_evaluators(), _eval_options()
    for i, step in enumerate(plan["eval"]):
        kind = step.get("kind") if isinstance(step, dict) else None
        if not isinstance(kind, str) or kind not in kinds:
            problems.append(f"eval.{i}: kind must be {' or '.join(kinds)}, got {kind!r}")
            continue
        extra = sorted(set(map(str, step)) - set(eval_options))
        if extra:
            problems.append(f"eval.{i}: unknown option(s) {', '.join(extra)}"
                            + _close(extra[0], eval_options)
                            + f"; valid: {', '.join(eval_options)}")
        if step.get("run") is not None and step["run"] not in plan["fit"]:
            problems.append(f"eval.{i}: run {step['run']!r} is not a fit step"
                            + _close(step["run"], plan["fit"]))
        if step.get("run") is None and not step.get("identity"):
            problems.append(f"eval.{i}: needs a run, or identity: true")
        for side in evaluator_spec(kind).stores:
            if step.get(side) not in plan["embed"]:
                problems.append(f"eval.{i}: {side} {step.get(side)!r} is not an embed step")
    similarity = plan.get("similarity") or {}
    if not isinstance(similarity, dict):
        problems.append("similarity: must be a mapping with stores (and sample, k, seed)")
        similarity = {}
    extra = sorted(set(map(str, similarity)) - set(SIMILARITY_OPTIONS))
    if extra:
        problems.append(f"similarity: unknown option(s) {', '.join(extra)}; valid: "
                        f"{', '.join(SIMILARITY_OPTIONS)}")
    for sid in similarity.get("stores", []):
        if sid not in plan["embed"]:
            problems.append(f"similarity: {sid!r} is not an embed step")
    for i, ref in enumerate(plan["reference"]):
        extra = sorted(set(map(str, ref)) - set(REFERENCE_OPTIONS)) if isinstance(ref, dict) \
            else ["(not a mapping)"]
        if extra:
            problems.append(f"reference.{i}: unknown option(s) {', '.join(extra)}; valid: "
                            f"{', '.join(REFERENCE_OPTIONS)}")
    return problems


def _unset(value: Any) -> set[str]:
    """Environment variables still written as ``${VAR}`` anywhere inside `value`."""
    if isinstance(value, str):
        return {m.group(1) for m in ENV_PATTERN.finditer(value)}
    if isinstance(value, dict):
        return set().union(*(_unset(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_unset(v) for v in value))
    return set()


def _missing_inputs(plan: dict) -> list[str]:
    """Inputs this run needs and this machine lacks: unset variables, data, weights.

    A variable counts only where a step needs it: the source of a manifest that already exists
    does not matter.
    """
    from alignpipe.app.pipeline.planning import make_source_problems, weights_problems

    hints = plan.get("inputs", {})
    unset: set[str] = set()
    lines = []
    used = {step["data"] for step in plan["embed"].values()}
    for sid in sorted(used):
        step = plan["data"][sid]
        if _unset(step["manifest"]):
            unset |= _unset(step["manifest"])
            continue
        if Path(step["manifest"]).exists():
            continue
        if not step.get("make"):
            lines.append(f"data.{sid}: manifest {step['manifest']} does not exist and the "
                         f"pipeline says nothing about making it")
        elif _unset(step["make"]):
            unset |= _unset(step["make"])
        else:
            lines.extend(f"data.{sid}: {p}" for p in make_source_problems(step["make"]))
    for sid, step in plan["embed"].items():
        if _unset(step):
            unset |= _unset(step)
        else:
            lines.extend(f"embed.{sid}: {p}" for p in weights_problems(step))
    for name in sorted(unset, reverse=True):
        hint = hints.get(name, "")
        lines.insert(0, f"${name} is not set" + (f": {hint}" if hint else ""))
    return lines


# ---- running ------------------------------------------------------------------------------------
def _store_of(plan: dict, embed_id: str) -> Path:
    """Where an embed step's store lives; the dataset name is the manifest's stem (no I/O)."""
    from alignpipe.data.store import store_path

    step = plan["embed"][embed_id]
    manifest = Path(plan["data"][step["data"]]["manifest"])
    return store_path(plan["cache"], step.get("dataset") or manifest.stem, str(step["encoder"]))


def _embed_kwargs(plan: dict, step: dict) -> dict:
    kwargs = {k: step[k] for k in EMBED_OPTIONS if k in step}
    if plan.get("device") and "device" not in kwargs:
        kwargs["device"] = plan["device"]
    return kwargs


class Runner:
    """Carries out one resolved plan, step by step, recording what ran and what was cached."""

    def __init__(self, plan: dict, dry_run: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.dry_run = dry_run
        self.progress = progress
        self.echo = echo
        self.folder = Path(plan["runs"]) / str(plan["name"])
        self.result = PipelineResult(name=str(plan["name"]), folder=self.folder)

    def record(self, stage: str, name: str, status: str, seconds: float = 0.0,
               detail: str = "") -> None:
        self.result.steps.append(StepRecord(stage, name, status, seconds, detail))
        timing = f" in {seconds:.1f}s" if status == "ran" else ""
        self.echo(f"[{stage}] {name}: {status}{timing}{'  ' + detail if detail else ''}")

    def guarded(self, stage: str, name: str, fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> tuple[Any, float]:
        """Run one step; a failure stops the pipeline with a message that says what is kept."""
        start = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except AlignpipeError as err:
            done = sum(1 for s in self.result.steps if s.status in ("ran", "cached"))
            raise PipelineError(
                f"step {stage}.{name} failed: {err}\n{done} earlier step(s) are kept in the "
                f"cache; fix the cause and rerun the same command to continue") from None
        return value, time.perf_counter() - start

    def make_data(self) -> None:
        from alignpipe.app.pipeline.planning import make_manifest

        used = {step["data"] for step in self.plan["embed"].values()}
        for sid in sorted(used):
            step = self.plan["data"][sid]
            if Path(step["manifest"]).exists():
                self.record("data", sid, "cached", detail=step["manifest"])
            elif self.dry_run:
                kind = (step.get("make") or {}).get("kind", "nothing: no make block")
                self.record("data", sid, "would run", detail=f"make {kind}")
            else:
                _, seconds = self.guarded("data", sid, make_manifest, step)
                self.record("data", sid, "ran", seconds, step["manifest"])

    def embed(self) -> None:
        from alignpipe.embed import embed, embed_status

        for sid, step in self.plan["embed"].items():
            manifest = self.plan["data"][step["data"]]["manifest"]
            kwargs = _embed_kwargs(self.plan, step)
            status_kwargs = {k: kwargs[k] for k in ("dataset", "column", "weights",
                                                    "image_size", "pooling", "latent_dtype")
                             if k in kwargs}
            status = (embed_status(manifest, str(step["encoder"]), self.plan["cache"],
                                   **status_kwargs)
                      if Path(manifest).exists() else "missing")
            if status == "complete":
                self.record("embed", sid, "cached", detail=str(_store_of(self.plan, sid)))
                continue
            if status == "conflict":
                raise PipelineError(
                    f"step embed.{sid}: {_store_of(self.plan, sid)} holds a store made with "
                    f"another encoder spec or manifest; remove it or rename the dataset")
            if self.dry_run:
                self.record("embed", sid, "would run", detail=f"{step['encoder']} ({status})")
                continue
            summary, seconds = self.guarded("embed", sid, embed, manifest, str(step["encoder"]),
                                            self.plan["cache"], progress=self.progress, **kwargs)
            self.record("embed", sid, "ran", seconds,
                        f"{summary.rows} rows, {summary.failed} failed, "
                        f"{summary.rows_per_s:.0f} rows/s")

    def fit(self) -> None:
        from alignpipe.app.render import CurvesPNG
        from alignpipe.fit import fit, run_state
        from alignpipe.fit.runfolder import read_identity

        for sid, step in self.plan["fit"].items():
            a, b = _store_of(self.plan, step["a"]), _store_of(self.plan, step["b"])
            select = fit_selections(self.plan, step)  # the curate steps it trains on, if any
            for run in fit_runs(self.plan, sid):
                out = self.folder / run.folder
                args = {"method": run.method, "config": run.config, "overrides": run.overrides}
                if select:
                    args["select"] = select
                if step.get("also"):  # more training pairs, of other manifests
                    args["also"] = [(_store_of(self.plan, p["a"]), _store_of(self.plan, p["b"]))
                                    for p in step["also"]]
                # missing | complete | incomplete (killed: resume it) | different (spec changed)
                stores = [a, b, *(s for pair in args.get("also", ()) for s in pair)]
                state = (run_state(out, a, b, **args)
                         if all(s.exists() for s in stores) and out.exists() else "missing")
                if state == "complete":
                    self.record("fit", run.folder, "cached", detail=f"{run.method} → {out}")
                    continue
                plan = {"missing": "", "incomplete": "resume a killed run",
                        "different": "replace a run made with another spec"}[state]
                old_method = (read_identity(out) or {}).get("method") if state == "different" \
                    else None
                if old_method and old_method != run.method:
                    plan = (f"replace the {old_method} run in {out} (list both as method: "
                            f"[{old_method}, {run.method}] to keep them side by side)")
                if self.dry_run:
                    self.record("fit", run.folder, "would run",
                                detail=f"{run.method} → {out}" + (f" ({plan})" if plan else ""))
                    continue
                # The pipeline owns runs/<name>/<folder>: a changed spec replaces what is there.
                summary, seconds = self.guarded(
                    "fit", run.folder, fit, a, b, out=out, device=self.plan.get("device"),
                    progress=self.progress, resume=state == "incomplete",
                    overwrite=state == "different", callbacks=[CurvesPNG()], **args)
                self.record("fit", run.folder, "ran", seconds,
                            f"{run.method}, best epoch {summary.best_epoch}"
                            + (f"; {plan}" if plan else ""))

    def _encoders(self, *embed_ids: str) -> list[str]:
        return [str(self.plan["embed"][sid]["encoder"]) for sid in embed_ids]

    def evaluate(self) -> None:
        from alignpipe.app.results import run_evaluation
        from alignpipe.evaluate import evaluator_spec

        for i, step in enumerate(self.plan["eval"]):
            kind = step["kind"]
            spec = evaluator_spec(kind)
            runs = fit_runs(self.plan, step["run"]) if step.get("run") else [None]
            sides = spec.stores
            for run in runs:
                label = run.folder if run else "identity"
                name = f"{i}:{kind}:{label}"
                if self.dry_run:
                    self.record("eval", name, "would run")
                    continue
                folder = self.folder / run.folder if run else None
                output = self.folder / "evals" / f"{i:02d}-{kind}-{label}.json"
                split = step.get("split", "test")
                # the kind's own options pass through, with its defaults where the entry is silent
                options = {key: step.get(key, default) for key, default in spec.options.items()}
                stores = [_store_of(self.plan, step[side]) for side in sides]
                metrics, seconds = self.guarded(
                    "eval", name, run_evaluation, kind, folder, stores, output=output, split=split,
                    identity=bool(step.get("identity")), **options)
                self.result.evals.append({
                    "index": i, "kind": kind, "run": run.folder if run else None,
                    "step": step.get("run"), "method": run.method if run else "identity",
                    "encoders": self._encoders(*(step[side] for side in sides)),
                    "split": split, "metrics": metrics, "output": str(output)})
                self.record("eval", name, "ran", seconds, f"→ {output}")

    def runs(self) -> list[dict]:
        """Every fit run of the plan: folder, method, and the stores and encoders it joined."""
        rows = []
        for sid, step in self.plan["fit"].items():
            for run in fit_runs(self.plan, sid):
                rows.append({"run": run.folder, "step": sid, "method": run.method,
                             "a": step["a"], "b": step["b"],
                             **({"select": [str(p) for p in fit_selections(self.plan, step)]}
                                if step.get("select") is not None else {}),
                             "encoders": self._encoders(step["a"], step["b"]),
                             "folder": str(self.folder / run.folder)})
        return rows

    def similarity(self) -> None:
        spec = self.plan.get("similarity")
        if not spec:
            return
        from alignpipe.app.results import similarity_to

        if self.dry_run:
            self.record("similarity", "stores", "would run")
            return
        stores = [_store_of(self.plan, sid) for sid in spec["stores"]]
        output = self.folder / "similarity.json"
        options = {k: spec[k] for k in ("sample", "k", "seed") if k in spec}
        value, seconds = self.guarded("similarity", "stores", similarity_to, output,
                                      stores, **options)
        self.result.similarity = value
        self.record("similarity", "stores", "ran", seconds)


def run_pipeline(path: str | Path, overrides: dict[str, str] | None = None,
                 dry_run: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print) -> PipelineResult:
    """Check everything, then make data, embed, fit, eval and report; reuse what is cached."""
    plan = load_pipeline(path, overrides)
    problems = check_plan(plan)
    if problems:
        raise PipelineError(f"{path}: the pipeline has {len(problems)} problem(s):\n  - "
                            + "\n  - ".join(problems))
    missing = _missing_inputs(plan)
    if missing and not dry_run:
        raise PipelineError(
            f"{path}: nothing was run because {len(missing)} input(s) are missing:\n  - "
            + "\n  - ".join(missing)
            + "\nSet the variables (or pass --set KEY=VALUE) and run again.")
    if missing:
        for line in missing:
            echo(f"[missing] {line}")
    runner = Runner(plan, dry_run=dry_run, progress=progress, echo=echo)
    started = time.perf_counter()
    runner.make_data()
    runner.embed()
    run_curate_steps(runner, _store_of)
    runner.fit()
    runner.evaluate()
    runner.similarity()
    if not dry_run:
        from alignpipe.app.pipeline.report import write_report

        runner.folder.mkdir(parents=True, exist_ok=True)
        runner.result.runs = runner.runs()
        atomic_write_text(runner.folder / "pipeline.resolved.yaml", yaml.safe_dump(
            {k: v for k, v in plan.items() if not k.startswith("_")}, sort_keys=False))
        atomic_write_text(runner.folder / "results.json",
                          json.dumps(runner.result.to_dict(), indent=2, default=str))
        runner.result.report = write_report(plan, runner.result,
                                            time.perf_counter() - started)
    return runner.result
