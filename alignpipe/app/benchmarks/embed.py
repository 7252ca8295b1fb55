"""`alignpipe bench embed`: is stage one bound by the encoder, or by our code?

On the same toy JPEGs, in one run:

- **embed**: `alignpipe.embed.embed` end to end (decode threads, device, background writes);
  rows/s over its encoding phase (model loading excluded).
- **bare loop**: the same encoder's forward on the same batches, already decoded and collated in
  memory: the ceiling embed can reach.
- **naive loop**: one thread that decodes a batch, runs it, decodes the next: what a script
  without a pipeline gets.

Targets: CPU with test-vit, embed faster than the naive loop; GPU with dinov2 at 224
(``--encoder dinov2 --weights random``: random weights cost the same forward pass), embed at
0.9x the bare loop or better.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from alignpipe.app.toy import make_toy
from alignpipe.data.manifest import read_manifest, write_manifest
from alignpipe.data.media import resolve_ref
from alignpipe.encoders import Encoder, load_encoder
from alignpipe.encoders.base import autocast, resolve_device, resolve_dtype


def toy_jpegs(folder: Path, rows: int) -> Path:
    """A toy manifest of `rows` rows, one distinct JPEG image (and clip, caption) per row."""
    make_toy(folder, rows=rows, captions_per_item=1)
    table = read_manifest(folder / "toy.parquet").table
    images = []
    for rel in table.column("image").to_pylist():
        if rel.endswith(".png"):
            jpg = rel[:-4] + ".jpg"
            Image.open(folder / rel).convert("RGB").save(folder / jpg, format="JPEG", quality=85)
            (folder / rel).unlink()
            rel = jpg
        images.append(rel)
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images))
    return write_manifest(table, folder / "toy-jpeg.parquet")


def _forward(encoder: Encoder, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    tensors = {k: v.to(encoder.device, non_blocking=True) for k, v in batch.items()}
    with torch.inference_mode():
        with autocast(encoder.device, dtype):
            latents = encoder.forward(tensors)
        return latents.float().cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _values(manifest_path: Path, encoder: Encoder) -> list:
    manifest = read_manifest(manifest_path)
    cells = manifest.column(encoder.modality)
    if encoder.modality == "text":
        return list(cells)
    return [resolve_ref(c, manifest.root) for c in cells]


def bare_loop(encoder: Encoder, values: list, batch_size: int, dtype: torch.dtype) -> float:
    """rows/s of the forward pass alone, on batches decoded and collated beforehand."""
    batches = [encoder.collate([encoder.prepare(v) for v in values[i:i + batch_size]])
               for i in range(0, len(values), batch_size)]
    if encoder.device.type == "cuda":
        batches = [{k: t.pin_memory() for k, t in b.items()} for b in batches]
    _forward(encoder, batches[0], dtype)  # warm-up: kernel selection, allocator
    _sync(encoder.device)
    began = time.perf_counter()
    for batch in batches:
        _forward(encoder, batch, dtype)
    _sync(encoder.device)
    return len(values) / (time.perf_counter() - began)


def naive_loop(encoder: Encoder, values: list, batch_size: int, dtype: torch.dtype) -> float:
    """rows/s of decode-then-forward in one thread, batch after batch."""
    _forward(encoder, encoder.collate([encoder.prepare(v) for v in values[:batch_size]]), dtype)
    began = time.perf_counter()
    for i in range(0, len(values), batch_size):
        _forward(encoder, encoder.collate([encoder.prepare(v) for v in values[i:i + batch_size]]),
                 dtype)
    _sync(encoder.device)
    return len(values) / (time.perf_counter() - began)


def run_embed_bench(encoder: str = "test-vit", rows: int = 2000, device: str | None = None,
                    quick: bool = False, weights: str | None = None,
                    image_size: int | None = None, batch_size: int | None = None,
                    workers: int | None = None, repeats: int = 1) -> list[dict]:
    """Rows of {name, value, unit}: embed, bare-loop and naive-loop rows/s and their ratios.

    With `repeats` > 1 the three are run in turn that many times and each keeps its best, so a
    burst of load from other processes does not decide a ratio.
    """
    from alignpipe.embed import embed, runner

    rows = min(rows, 200) if quick else rows
    resolved = resolve_device(device)
    best = {"embed": 0.0, "bare": 0.0, "naive": 0.0}
    with tempfile.TemporaryDirectory(prefix="alignpipe-bench-") as tmp:
        manifest = toy_jpegs(Path(tmp) / "toy", rows)
        for _ in range(max(1, repeats)):
            summary = embed(manifest, encoder, Path(tmp) / "cache", weights=weights,
                            image_size=image_size, device=str(resolved), batch_size=batch_size,
                            workers=workers, progress=False, overwrite=True)
            runner.clear_encoder_cache()  # free embed's model before the loops load theirs
            batch = int(summary.extra["batch_size"])
            model = load_encoder(encoder, weights=weights, image_size=image_size,
                                 device=str(resolved))
            dtype = resolve_dtype(None, resolved)
            values = _values(manifest, model)
            best["embed"] = max(best["embed"], summary.rows_per_s)
            best["bare"] = max(best["bare"], bare_loop(model, values, batch, dtype))
            best["naive"] = max(best["naive"], naive_loop(model, values, batch, dtype))
            del model
    note = f"best of {repeats}, " if repeats > 1 else ""
    return [
        {"name": f"rows ({encoder}, {resolved}, batch {batch}, {note}{summary.extra['workers']}"
                 f" decode workers)", "value": rows, "unit": "rows"},
        {"name": "embed", "value": best["embed"], "unit": "rows/s"},
        {"name": "bare forward loop", "value": best["bare"], "unit": "rows/s"},
        {"name": "embed / bare loop", "value": best["embed"] / best["bare"], "unit": "x"},
        {"name": "naive decode→forward loop", "value": best["naive"], "unit": "rows/s"},
        {"name": "embed / naive loop", "value": best["embed"] / best["naive"], "unit": "x"},
    ]
