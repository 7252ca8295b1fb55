"""Seeded train/val/test splits for a manifest that has none (``alignpipe manifest split``).

Adding a split column by hand changes the manifest's sha256 and so invalidates every store made
from it; assign the splits once, before embedding, with a seed that makes them reproducible.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from alignpipe.data.builders._common import BuildResult, SplitPlan, apply_splits, split_summary
from alignpipe.data.builders.registry import (
    OUT,
    SPLIT_SEED,
    Option,
    register_builder,
    split_plan_of,
)
from alignpipe.data.manifest import FILE_COLUMNS, read_manifest, validate, write_manifest
from alignpipe.util.errors import ManifestError


def build_split(source: str | Path, out: str | Path, plan: SplitPlan) -> BuildResult:
    """`source` (any manifest format) with a split column assigned by `plan`, written to `out`
    (parquet); every other column and the row order are kept."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise ManifestError(f"{out}: manifests are written as parquet; name the output .parquet")
    manifest = read_manifest(source)
    table = manifest.table
    data = {name: manifest.column(name) for name in ("id", *FILE_COLUMNS, "split")
            if manifest.has(name)}
    notes = apply_splits(data, plan)
    split = pa.array(data["split"], pa.string()) if "split" in data else None
    if split is not None and manifest.has("split"):
        table = table.set_column(table.column_names.index("split"), "split", split)
    elif split is not None:
        table = table.append_column("split", split)
    write_manifest(validate(table, out), out)
    return BuildResult(path=out, rows=table.num_rows,
                       splits=split_summary(data.get("split") or [], True), notes=notes)


@register_builder("split", source="source", options=(
    Option("source", Path, positional=True, exists=True,
           help="A manifest (.parquet, .csv, .tsv, .jsonl)."),
    OUT,
    Option("split_fractions", str, help="train,val,test fractions summing to 1, e.g. 0.8,0.1,0.1. "
           "Rows sharing an image or audio file stay together."),
    SPLIT_SEED,
    Option("override_split", bool, False,
           "Replace an existing split column (by default it is kept, and said so).")))
def _split_builder(source: Path, out: Path, split_fractions: str, split_seed: int,
                   override_split: bool) -> BuildResult:
    """Add seeded train/val/test splits to a manifest; do it before embedding anything."""
    # Any later edit of the manifest changes its sha256 and so invalidates its stores.
    return build_split(source, out, split_plan_of(split_fractions, split_seed, override_split))
