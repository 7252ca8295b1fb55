"""What every evaluator shares: the space the stores are compared in, the rows scored, and the
name and provenance of a result.

Scores a fitted run (heads), an asif run (anchors), or, with ``identity=True``, two stores that
already share a space (CLIP's two towers). Every number is a percentage. Ties count against the
query, and a non-finite score is a miss (see metrics.py).

Default result names say what produced them, so two evals never overwrite each other's files:
``eval-{kind}-{split}[-{class embedding}][-identity]__{store}__{store}.json`` in the run folder
(in the working folder for ``identity``), where each store is named ``{parent}-{folder}`` of
its path (``cache/toy/minilm`` → ``toy-minilm``). A default file left by another eval of the
same name (stores under another cache root) is refused, not replaced; ``output`` picks any path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from alignpipe.data.manifest import SPLITS, file_sha256
from alignpipe.data.pairing import check_encoder, load_rows, split_rows, storage_dtype
from alignpipe.data.store import LatentStore
from alignpipe.evaluate.metrics import nonfinite_rows
from alignpipe.methods.space import Encoded, num_rows
from alignpipe.util.errors import AlignpipeError

if TYPE_CHECKING:
    from alignpipe.data.manifest import Manifest

CLASS_EMBEDDINGS = {
    "mean": "CLIP: mean of the normalised template encodings of a class, renormalised",
    "max": "ASIF: a class scores the best of its templates",
}
ALL_ROWS = "all"
EVAL_SPLITS = (*SPLITS, ALL_ROWS)
QUERY_CHUNK = 2048
CONFUSION_MAX_CLASSES = 50


# ---- the space both stores are compared in ------------------------------------------------------
def open_space(run: str | Path | None, identity: bool, stores: list[LatentStore],
               device: torch.device) -> tuple[Callable[[LatentStore, torch.Tensor], Encoded], dict]:
    """An encoder for each store's latents, plus what was used (for the results file).

    The info holds the run's name, method and the sha256 of the heads (or anchors) file scored,
    and, under ``_trained_on``, the sha256 of the manifest(s) the run was fitted on.
    """
    if identity:
        if run is not None:
            raise AlignpipeError("give either a run or --identity, not both")
        dims = {s.dim for s in stores}
        if len(dims) > 1:
            raise AlignpipeError(
                "--identity compares the stores' latents directly, so their dims must match; got "
                + ", ".join(f"{s.path} ({s.dim})" for s in stores))
        return (lambda store, x: F.normalize(x.float(), dim=-1)), {"identity": True,
                                                                   "_trained_on": set()}
    if run is None:
        raise AlignpipeError("give a run folder (--run RUN) or --identity for stores already in "
                             "one space")
    from alignpipe.fit import load_run
    from alignpipe.fit.runfolder import ANCHORS, HEADS_BEST

    loaded = load_run(run, device, stores=stores)  # an asif run's stores may have moved
    sides = {}
    for store in stores:
        side = loaded.side_of(store.modality)
        if side is None:
            trained = [loaded.identity["stores"][s]["modality"] for s in ("a", "b")]
            raise AlignpipeError(f"{store.path}: holds {store.modality} latents but run {run} "
                                 f"aligns {' and '.join(trained)}")
        check_encoder(store, loaded.identity["stores"][side]["encoder"], side)
        sides[store.path] = side
    weights = Path(run) / (HEADS_BEST if loaded.method.trained else ANCHORS)
    info = {"run": str(run), "run_name": Path(run).resolve().name,
            "method": loaded.identity["method"], "identity": False,
            "heads": {"file": weights.name,
                      "sha256": file_sha256(weights) if weights.exists() else None},
            "_trained_on": {loaded.identity["stores"][s].get("manifest_sha256")
                            for s in ("a", "b")}}
    return (lambda store, x: loaded.method.encode(sides[store.path], x)), info


def _encode_rows(encode: Callable[[LatentStore, torch.Tensor], Encoded], store: LatentStore,
                 rows: np.ndarray, device: torch.device) -> Encoded:
    return encode(store, load_rows(store, rows, device, storage_dtype(device)))


def _check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise AlignpipeError(f"unknown split {split!r}; choose one of {', '.join(EVAL_SPLITS)} "
                             f"({ALL_ROWS!r} scores every row)")


def _rows_to_score(manifest: Manifest, split: str, info: dict,
                   hint: str = "") -> tuple[np.ndarray, str, list[str]]:
    """Rows of `split`, the sentence the results say about them, and warnings.

    A manifest without a split column has no test (or val, or train) rows: asking for one is
    refused rather than scoring every row, training rows included; ``all`` scores every row.
    """
    trained = manifest.sha256 in info["_trained_on"]
    run_rows = f"the rows the run in {info.get('run')} was fitted on" if trained else ""
    if split == ALL_ROWS:
        note = "all rows" + (f", including {run_rows}" if trained else "")
        warnings = [f"scored every row of {manifest.path.name}, including {run_rows}: not a "
                    f"held-out number"] if trained else []
        return np.arange(manifest.rows, dtype=np.int64), note, warnings
    if not manifest.has("split"):
        raise AlignpipeError(
            f"{manifest.path}: has no split column, so it has no {split!r} rows; ask for split "
            f"{ALL_ROWS!r} (--split {ALL_ROWS}, or split: {ALL_ROWS} in a pipeline) to score "
            f"every row" + (f" (including {run_rows})" if trained else "")
            + ", or give the manifest a split column (alignpipe manifest split)"
            + (f"; {hint}" if hint else ""))
    return split_rows(manifest, split), split, []


def _nonfinite(encodings: dict[str, Encoded], result: dict) -> None:
    """Count encodings holding NaN/inf (each scores as a miss) into the result, with a warning."""
    counts = {name: nonfinite_rows(enc) for name, enc in encodings.items()}
    result["nonfinite_rows"] = counts
    bad = {name: n for name, n in counts.items() if n}
    if bad:
        result.setdefault("warnings", []).append(
            "non-finite encodings (NaN/inf), each scored as a miss: "
            + ", ".join(f"{n} of {num_rows(encodings[name])} {name}" for name, n in bad.items()))


# ---- where results go ---------------------------------------------------------------------------
def store_tag(store: LatentStore) -> str:
    """``cache/toy/minilm`` → ``toy-minilm``: the part of a result name that names a store."""
    path = Path(store.path).resolve()
    tag = f"{path.parent.name}-{path.name}" if path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._+-]", "_", tag)


def result_name(kind: str, split: str, stores: list[LatentStore], options: list[str]) -> str:
    """The default result stem: kind, split, options that change the number, then the stores."""
    return "__".join(["-".join(["eval", kind, split, *options]),
                      *(store_tag(s) for s in stores)])


def output_path(output: str | Path | None, run: str | Path | None, stem: str,
                produced_by: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Where the result goes, and `produced_by(folder)`: what made it, paths relative to there."""
    path = Path(output) if output is not None else (
        (Path(run) if run is not None else Path.cwd()) / f"{stem}.json")
    made = produced_by(path.parent)
    if output is None:
        _refuse_foreign(path, made)
    return path, made


def _refuse_foreign(path: Path, produced_by: dict) -> None:
    """A default-named result written by another eval (other stores, same names) stays."""
    try:
        old = json.loads(path.read_text()).get("produced_by")
    except (OSError, ValueError, AttributeError):
        return
    if old is not None and old != produced_by:
        raise AlignpipeError(
            f"{path}: holds the result of another eval ({old.get('stores')}); give --output to "
            f"write this one elsewhere")


def _produced_by(kind: str, split: str, run: str | Path | None, stores: dict[str, LatentStore],
                 **options: Any) -> Callable[[Path], dict]:
    """What made a result, given the result's folder: run and store paths are recorded relative
    to it, so a project moved as a whole still recognises its own results."""
    def made(folder: Path) -> dict:
        def rel(p: str | Path) -> str:
            return os.path.relpath(Path(p).resolve(), Path(folder).resolve())
        return {"kind": kind, "split": split, "run": rel(run) if run else None,
                "stores": {k: rel(s.path) for k, s in stores.items()}, **options}
    return made


def _public(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}
