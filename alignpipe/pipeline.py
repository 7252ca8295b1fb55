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
    fit:                           # id -> one run on two stores
      image-text: {method: fusemix, a: toy-image, b: toy-text, set: {epochs: 20}}
    eval:                          # a list of scores
      - {kind: zeroshot, run: image-text, query: toy-image, prompts: prompts-text}
      - {kind: retrieval, run: image-text, a: toy-image, b: toy-text, split: test}
    similarity: {stores: [toy-image, toy-text]}
    x-shared: &shared {epochs: 40}     # any `x-` key: a place for YAML anchors, ignored
    reference:                     # the papers' numbers, printed beside ours
      - {eval: 0, metric: top1, value: 76.0, source: "freeze-align (CVPR 2025)"}

Strings may use ``${VAR}`` or ``${VAR:-default}``. ``--set`` takes dotted keys into this tree
(``fit.image-text.method=mlp``, ``eval.0.split=val``, ``data.imagenet.make.source=/data``).
Each step is skipped when the cache already holds its result with the same spec.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignpipe.errors import AlignpipeError

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SECTIONS = ("name", "cache", "runs", "inputs", "data", "embed", "fit", "eval", "similarity",
            "reference", "device")
EMBED_OPTIONS = ("column", "weights", "image_size", "pooling", "dtype", "latent_dtype",
                 "batch_size", "workers", "unit_rows", "device", "max_failure_rate", "dataset")


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

    def to_dict(self) -> dict:
        return {"name": self.name, "folder": str(self.folder),
                "steps": [s.__dict__ for s in self.steps], "evals": self.evals,
                "similarity": self.similarity}


# ---- loading ------------------------------------------------------------------------------------
def _interpolate(value):
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


def _unshared(value):
    """A copy in which no two places share an object: YAML anchors (``*name``) alias one dict,
    and an override of one step must not change the others."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _set_dotted(tree: dict, dotted: str, value) -> None:
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
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def load_pipeline(path: str | Path, overrides: dict[str, str] | None = None) -> dict:
    """Read a pipeline file, apply ``--set`` overrides, fill ``${VAR}`` where it is set."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: pipeline file not found")
    try:
        plan = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(plan, dict):
        raise PipelineError(f"{path}: a pipeline file is a mapping with sections "
                            f"{', '.join(SECTIONS)}")
    # `x-` keys hold YAML anchors shared by steps (as in docker compose); the runner ignores them
    plan = _unshared({k: v for k, v in plan.items() if not str(k).startswith("x-")})
    unknown = sorted(set(plan) - set(SECTIONS))
    if unknown:
        raise PipelineError(f"{path}: unknown section(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(SECTIONS)}")
    for key, raw in (overrides or {}).items():
        _set_dotted(plan, key, yaml.safe_load(raw) if raw != "" else "")
    plan = _interpolate(plan)
    plan.setdefault("name", path.stem)
    plan.setdefault("cache", "cache")
    plan.setdefault("runs", "runs")
    for section in ("data", "embed", "fit", "inputs"):
        plan[section] = plan.get(section) or {}
        if not isinstance(plan[section], dict):
            raise PipelineError(f"{path}: section {section!r} must map ids to steps")
    plan["eval"] = plan.get("eval") or []
    plan["reference"] = plan.get("reference") or []
    plan["_file"] = str(path)
    return plan


# ---- checking -----------------------------------------------------------------------------------
def check_plan(plan: dict) -> list[str]:
    """Structural problems: unknown references, unregistered encoders and methods.

    Needs no data, so it also checks pipelines whose datasets are not on this machine.
    """
    from alignpipe import encoders, methods

    problems = []
    for sid, step in plan["data"].items():
        if not isinstance(step, dict) or "manifest" not in step:
            problems.append(f"data.{sid}: needs a 'manifest' path")
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
            problems.append(f"embed.{sid}: unknown option(s) {', '.join(extra)}")
    for sid, step in plan["fit"].items():
        if not isinstance(step, dict):
            problems.append(f"fit.{sid}: must be a mapping")
            continue
        if not methods.is_registered(str(step.get("method"))):
            problems.append(f"fit.{sid}: unknown method {step.get('method')!r} (see "
                            f"`alignpipe fit --list-methods`)")
        for side in ("a", "b"):
            if step.get(side) not in plan["embed"]:
                problems.append(f"fit.{sid}: {side} {step.get(side)!r} is not an embed step")
        if step.get("config") and not Path(step["config"]).exists():
            problems.append(f"fit.{sid}: config file {step['config']} not found")
    for i, step in enumerate(plan["eval"]):
        kind = step.get("kind") if isinstance(step, dict) else None
        if kind not in ("retrieval", "zeroshot"):
            problems.append(f"eval.{i}: kind must be retrieval or zeroshot, got {kind!r}")
            continue
        if step.get("run") is not None and step["run"] not in plan["fit"]:
            problems.append(f"eval.{i}: run {step['run']!r} is not a fit step")
        if step.get("run") is None and not step.get("identity"):
            problems.append(f"eval.{i}: needs a run, or identity: true")
        sides = ("a", "b") if kind == "retrieval" else ("query", "prompts")
        for side in sides:
            if step.get(side) not in plan["embed"]:
                problems.append(f"eval.{i}: {side} {step.get(side)!r} is not an embed step")
    for sid in (plan.get("similarity") or {}).get("stores", []):
        if sid not in plan["embed"]:
            problems.append(f"similarity: {sid!r} is not an embed step")
    return problems


def _unset(value) -> set[str]:
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
    from alignpipe.planning import make_source_problems, weights_problems

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
    from alignpipe.store import store_path

    step = plan["embed"][embed_id]
    manifest = Path(plan["data"][step["data"]]["manifest"])
    return store_path(plan["cache"], step.get("dataset") or manifest.stem, str(step["encoder"]))


def _embed_kwargs(plan: dict, step: dict) -> dict:
    kwargs = {k: step[k] for k in EMBED_OPTIONS if k in step}
    if plan.get("device") and "device" not in kwargs:
        kwargs["device"] = plan["device"]
    return kwargs


def _fit_overrides(step: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in (step.get("set") or {}).items()}


class Runner:
    """Carries out one resolved plan, step by step, recording what ran and what was cached."""

    def __init__(self, plan: dict, dry_run: bool = False, progress: bool = True,
                 echo=print):
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

    def guarded(self, stage: str, name: str, fn, *args, **kwargs):
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
        from alignpipe.planning import make_manifest

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
        from alignpipe.fit import fit, run_state

        for sid, step in self.plan["fit"].items():
            out = self.folder / sid
            a, b = _store_of(self.plan, step["a"]), _store_of(self.plan, step["b"])
            args = {"method": step["method"], "config": step.get("config"),
                    "overrides": _fit_overrides(step)}
            # missing | complete | incomplete (killed: resume it) | different (spec changed)
            state = (run_state(out, a, b, **args) if a.exists() and b.exists() and out.exists()
                     else "missing")
            if state == "complete":
                self.record("fit", sid, "cached", detail=str(out))
                continue
            plan = {"missing": "", "incomplete": "resume a killed run",
                    "different": "replace a run made with another spec"}[state]
            if self.dry_run:
                self.record("fit", sid, "would run",
                            detail=f"{step['method']} → {out}" + (f" ({plan})" if plan else ""))
                continue
            # The pipeline owns runs/<name>/<fit id>: a changed spec replaces what is there.
            summary, seconds = self.guarded(
                "fit", sid, fit, a, b, out=out, device=self.plan.get("device"),
                progress=self.progress, resume=state == "incomplete",
                overwrite=state == "different", **args)
            self.record("fit", sid, "ran", seconds,
                        f"best epoch {summary.best_epoch}" + (f"; {plan}" if plan else ""))

    def evaluate(self) -> None:
        from alignpipe.evaluate import eval_retrieval, eval_zeroshot

        for i, step in enumerate(self.plan["eval"]):
            kind = step["kind"]
            run = self.folder / step["run"] if step.get("run") else None
            name = f"{i}:{kind}:{step.get('run') or 'identity'}"
            if self.dry_run:
                self.record("eval", name, "would run")
                continue
            output = self.folder / "evals" / f"{i:02d}-{kind}-{step.get('run') or 'identity'}.json"
            common = {"split": step.get("split", "test"), "identity": bool(step.get("identity")),
                      "output": output}
            if kind == "retrieval":
                metrics, seconds = self.guarded(
                    "eval", name, eval_retrieval, run, _store_of(self.plan, step["a"]),
                    _store_of(self.plan, step["b"]), **common)
            else:
                metrics, seconds = self.guarded(
                    "eval", name, eval_zeroshot, run, _store_of(self.plan, step["query"]),
                    _store_of(self.plan, step["prompts"]),
                    class_embedding=step.get("class_embedding", "mean"), **common)
            self.result.evals.append({"index": i, "kind": kind, "run": step.get("run"),
                                      "split": step.get("split", "test"), "metrics": metrics,
                                      "output": str(output)})
            self.record("eval", name, "ran", seconds)

    def similarity(self) -> None:
        spec = self.plan.get("similarity")
        if not spec:
            return
        from alignpipe.similarity import similarity

        if self.dry_run:
            self.record("similarity", "stores", "would run")
            return
        stores = [_store_of(self.plan, sid) for sid in spec["stores"]]
        output = self.folder / "similarity.json"
        options = {k: spec[k] for k in ("sample", "k", "seed") if k in spec}
        value, seconds = self.guarded("similarity", "stores", similarity, stores,
                                      output=output, **options)
        self.result.similarity = value
        self.record("similarity", "stores", "ran", seconds)


def run_pipeline(path: str | Path, overrides: dict[str, str] | None = None,
                 dry_run: bool = False, progress: bool = True, echo=print) -> PipelineResult:
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
    runner.fit()
    runner.evaluate()
    runner.similarity()
    if not dry_run:
        from alignpipe.pipeline_report import write_report

        runner.folder.mkdir(parents=True, exist_ok=True)
        (runner.folder / "pipeline.resolved.yaml").write_text(
            yaml.safe_dump({k: v for k, v in plan.items() if not k.startswith("_")},
                           sort_keys=False))
        (runner.folder / "results.json").write_text(
            json.dumps(runner.result.to_dict(), indent=2, default=str))
        runner.result.report = write_report(plan, runner.result,
                                            time.perf_counter() - started)
    return runner.result
