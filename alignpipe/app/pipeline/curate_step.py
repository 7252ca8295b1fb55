"""The pipeline's ``curate:`` section: selections made from embed steps, fed to fit steps.

::

    curate:
      target: {pool: pool-text, concepts: [prompts-text], per_concept: 40}   # alignpipe curate
      random: {pool: pool-text, random: target, seed: 0}  # as many random train rows as target
    fit:
      curated: {method: fusemix, a: pool-image, b: pool-text, select: target}

Options of a curated step: ``pool``, ``concepts`` (embed ids), ``per_concept``, ``threshold``,
``balance``, ``dedupe`` (an embed id of the pool, e.g. its image store), ``dedupe_threshold``,
``min_rows``. A random step takes ``pool``, ``random`` (a row count, or a curate id whose
train-split rows it matches) and ``seed``. Each selection is written to
``<runs>/<name>/curate/<id>.parquet`` with its spec beside it (``<id>.spec.json``); a step whose
spec and inputs are unchanged is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from alignpipe.app.pipeline.runner import Runner

    # (plan, embed id) -> the folder of that embed step's store (runner.py's `_store_of`)
    StoreOf = Callable[[dict, str], Path]

CURATE_OPTIONS = ("pool", "concepts", "per_concept", "threshold", "balance", "dedupe",
                  "dedupe_threshold", "min_rows", "random", "seed")


def selection_path(plan: dict, sid: str) -> Path:
    return Path(plan["runs"]) / str(plan["name"]) / "curate" / f"{sid}.parquet"


def fit_selections(plan: dict, step: dict) -> list[Path] | None:
    """The selection files a fit step's ``select:`` names (None when it has none)."""
    select = step.get("select")
    if select is None:
        return None
    ids = select if isinstance(select, list) else [select]
    return [selection_path(plan, str(i)) for i in ids]


def _is_random(step: dict) -> bool:
    return step.get("random") is not None


def curate_problems(plan: dict) -> list[str]:
    """Structural problems of the curate section and of fit steps' ``select:`` (no data read)."""
    from alignpipe.util.names import plain_name_problem

    problems = []
    steps = plan.get("curate") or {}
    if not isinstance(steps, dict):
        return ["curate: must map ids to steps"]
    for sid, step in steps.items():
        where = f"curate.{sid}"
        problems += [p for p in [plain_name_problem(str(sid), f"{where}: the curate id")] if p]
        if not isinstance(step, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        extra = sorted(set(map(str, step)) - set(CURATE_OPTIONS))
        if extra:
            problems.append(f"{where}: unknown option(s) {', '.join(extra)}; valid: "
                            f"{', '.join(CURATE_OPTIONS)}")
        if step.get("pool") not in plan["embed"]:
            problems.append(f"{where}: pool {step.get('pool')!r} is not an embed step")
        if _is_random(step):
            rnd = step["random"]
            if isinstance(rnd, bool) or not (isinstance(rnd, int) and rnd > 0
                                             or isinstance(rnd, str) and rnd in steps
                                             and not _is_random(steps[rnd])):
                problems.append(f"{where}: random is a row count ≥ 1 or the id of a curated "
                                f"step to match, got {rnd!r}")
            continue
        concepts = step.get("concepts")
        concepts = concepts if isinstance(concepts, list) else [concepts]
        for c in concepts:
            if c not in plan["embed"]:
                problems.append(f"{where}: concepts {c!r} is not an embed step")
        n = step.get("per_concept", 50_000)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            problems.append(f"{where}: per_concept must be an integer ≥ 1, got {n!r}")
        if step.get("dedupe") is not None and step["dedupe"] not in plan["embed"]:
            problems.append(f"{where}: dedupe {step['dedupe']!r} is not an embed step")
    for fid, step in plan["fit"].items():
        if not isinstance(step, dict) or step.get("select") is None:
            continue
        ids = step["select"] if isinstance(step["select"], list) else [step["select"]]
        for i in ids:
            if i not in steps:
                problems.append(f"fit.{fid}: select {i!r} is not a curate step")
    return problems


def _spec(plan: dict, sid: str, store_of: StoreOf) -> dict[str, Any]:
    """What decides the selection: the options and what each input store is."""
    from alignpipe.data.store import open_store

    step = plan["curate"][sid]

    def what(embed_id: str) -> dict:
        store = open_store(store_of(plan, embed_id))
        return {"store": str(store.path), "manifest": store.manifest_info.get("sha256"),
                "encoder": store.encoder.get("name"), "units": len(store.done_units())}

    spec: dict[str, Any] = {"options": {k: step[k] for k in CURATE_OPTIONS if k in step},
                            "pool": what(step["pool"])}
    if _is_random(step):
        if isinstance(step["random"], str):
            from alignpipe.curate.selection import file_sha256

            spec["match"] = file_sha256(selection_path(plan, step["random"]))
        return spec
    concepts = step["concepts"] if isinstance(step["concepts"], list) else [step["concepts"]]
    spec["concepts"] = [what(c) for c in concepts]
    if step.get("dedupe") is not None:
        spec["dedupe"] = what(step["dedupe"])
    return spec


def run_curate_steps(runner: Runner, store_of: StoreOf) -> None:
    """Make every selection the plan names (curated steps first, then random baselines)."""
    plan = runner.plan
    steps = plan.get("curate") or {}
    order = [s for s in steps if not _is_random(steps[s])] + \
        [s for s in steps if _is_random(steps[s])]
    for sid in order:
        step, out = steps[sid], selection_path(plan, sid)
        if runner.dry_run:
            runner.record("curate", sid, "would run", detail=str(out))
            continue
        spec_file = out.with_suffix(".spec.json")
        spec = _spec(plan, sid, store_of)
        if out.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
            runner.record("curate", sid, "cached", detail=str(out))
            continue
        rows, seconds = runner.guarded("curate", sid, _make, plan, sid, step, out, store_of,
                                       runner.progress)
        from alignpipe.util.fsutil import atomic_write_json

        atomic_write_json(spec_file, spec)
        runner.record("curate", sid, "ran", seconds, f"{rows} rows → {out}")


def _make(plan: dict, sid: str, step: dict, out: Path, store_of: StoreOf,
          progress: bool) -> int:
    from alignpipe.app.curate import run_curate
    from alignpipe.curate import random_selection, read_selection, train_rows_of, write_selection

    pool = store_of(plan, step["pool"])
    if _is_random(step):
        rows = step["random"]
        if isinstance(rows, str):
            from alignpipe.data.pairing import store_manifest
            from alignpipe.data.store import open_store

            rows = train_rows_of(read_selection(selection_path(plan, rows)),
                                 store_manifest(open_store(pool)))
        write_selection(random_selection(pool, rows, seed=int(step.get("seed", 0))), out)
        return rows
    concepts = step["concepts"] if isinstance(step["concepts"], list) else [step["concepts"]]
    curation = run_curate(
        pool, [store_of(plan, c) for c in concepts], out,
        per_concept=int(step.get("per_concept", 50_000)), threshold=step.get("threshold"),
        balance=step.get("balance"),
        dedupe_store=store_of(plan, step["dedupe"]) if step.get("dedupe") else None,
        dedupe_threshold=float(step.get("dedupe_threshold", 0.95)),
        min_rows=step.get("min_rows"), device=plan.get("device"), progress=progress)
    return len(curation.selection)
