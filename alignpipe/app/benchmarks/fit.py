"""`alignpipe bench fit`: the training loop against the two ways it could be slower.

On the same random latents, in one run:

- **fit loop**: `alignpipe.fit.fit` itself (latents resident on the device, batches by
  permutation); its rate counts only training steps, not validation or checkpoints.
- **DataLoader loop**: the FuseMix code's way: a map-style Dataset over a dict of per-row tensors
  keyed by ``str(index)``, ``DataLoader(shuffle=True)`` with default collation, each batch moved
  to the device; then the same heads, mixing, loss and AdamW step.
- **pure compute**: the same steps on a few pre-made device batches: what the loop could reach
  if drawing a batch cost nothing.

Rates are dataset rows consumed per second ("pairs/s"; FuseMix consumes two rows per mixed pair).
Model FLOPs per step (heads forward + backward, logits) give the achieved TFLOP/s, the MFU
against a peak (``--peak-tflops``, or known GPUs), and the projected time of the full FuseMix
schedule (~62k steps at B = 20,480 on 1536-d image and 1024-d text latents).

``run_quality`` is the other benchmark: methods × training-set sizes on the synthetic data.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from alignpipe.data.manifest import read_manifest, write_manifest
from alignpipe.data.pairing import resolve_device, storage_dtype, to_device
from alignpipe.data.store import create_store, open_store
from alignpipe.methods import create_method

if TYPE_CHECKING:
    from alignpipe.fit import FitSummary
    from alignpipe.methods.base import TrainedMethod

#: One optimiser step on a block of raw latents (side a, side b); returns the loss.
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
FUSEMIX_SCHEDULE = {"steps": 62_000, "batch": 20_480, "dims": (1536, 1024)}
# Each loop is timed over ROUNDS windows of WINDOW steps and reported by its best window: on a
# shared machine a window can lose its cores to another process, and all three loops get the
# same chance of a quiet window. fit's windows are its epochs (WINDOW steps each).
# The three loops also take turns, PASSES times over, so a busy minute hits one pass of each.
WINDOW, ROUNDS, PASSES, WARMUP_STEPS = 20, 3, 2, 3


@dataclass
class Case:
    name: str
    method: str
    dims: tuple[int, int]
    rows: int
    batch: int
    config: dict = field(default_factory=dict)


def default_cases(device: torch.device, quick: bool) -> list[Case]:
    """Rows are WINDOW steps' worth, so each fit epoch is one timing window."""
    if device.type == "cuda":
        batch = 8192 if quick else 20_480
        return [Case("fusemix paper heads", "fusemix", (1536, 1024), 2 * batch * WINDOW, batch)]
    batch = 256 if quick else 512
    return [
        Case("fusemix paper heads (CPU dims)", "fusemix", (384, 256), 2 * batch * WINDOW, batch),
        Case("linear heads (data-path bound)", "linear", (384, 256), 256 * WINDOW, 256,
             {"out_dim": 64}),
    ]


# ---- data ---------------------------------------------------------------------------------------
def _write_stores(folder: Path, case: Case, seed: int = 0) -> tuple[Path, Path]:
    """Random latents with a little shared structure, as two stores of one manifest."""
    rng = np.random.default_rng(seed)
    val = 512
    n = case.rows + val
    split = ["train"] * case.rows + ["val"] * val
    manifest = read_manifest(write_manifest(pa.table({
        "id": [f"r{i:08d}" for i in range(n)], "image": [f"i/{i}" for i in range(n)],
        "text": [f"t{i}" for i in range(n)], "split": split}), folder / "bench.parquet"))
    shared = rng.standard_normal((n, 32), dtype=np.float32)
    paths = []
    for side, (modality, dim) in enumerate(zip(("image", "text"), case.dims, strict=True)):
        mix = rng.standard_normal((32, dim), dtype=np.float32) / 6
        store = create_store(folder / f"store-{side}", rows=n, dim=dim, modality=modality,
                             encoder={"name": f"bench-{modality}", "backend": "bench"},
                             manifest=manifest, unit_rows=65536)
        for unit in range(store.n_units):
            start, stop = store.unit_range(unit)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
            store.write_unit(unit, shared[start:stop] @ mix + noise,
                             np.ones(stop - start, dtype=bool))
        paths.append(store.path)
    return paths[0], paths[1]


# ---- the three loops ----------------------------------------------------------------------------
def _method(case: Case, device: torch.device) -> tuple[TrainedMethod, dict]:
    from alignpipe.fit import resolve_config

    config = resolve_config(case.method, overrides=case.config)
    return create_method(case.method, config, *case.dims).to(device), config


def _step_fn(method: TrainedMethod, config: dict, device: torch.device) -> Step:
    """One optimiser step of `method` on a block of raw latents (the same math as fit's loop)."""
    optimizer = torch.optim.AdamW(method.parameter_groups(config["weight_decay"]),
                                  lr=config["lr"], betas=(0.9, 0.999))
    bf16 = device.type == "cuda"
    rng = np.random.default_rng(0)

    def step(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method.training_loss(xa, xb, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step()
        return loss

    method.train()
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], step: Step,
           device: torch.device, rows_per_step: int) -> float:
    """Rows per second of the best of ROUNDS windows of WINDOW steps, after a warm-up."""
    iterator = iter(batches)
    for _ in range(WARMUP_STEPS):
        step(*next(iterator))
    best = 0.0
    for _ in range(ROUNDS):
        _sync(device)
        started = time.perf_counter()
        for _ in range(WINDOW):
            step(*next(iterator))
        _sync(device)
        best = max(best, WINDOW * rows_per_step / (time.perf_counter() - started))
    return best


class FeaturePairs(torch.utils.data.Dataset):
    """FuseMix's FeaturePairDataset: per-row tensors in dicts keyed by str(index)."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        # torch-owned tensors, as torch.load gives FuseMix (numpy-owned memory is slower)
        self.vis = {str(i): torch.tensor(row) for i, row in enumerate(a)}
        self.text = {str(i): torch.tensor(row) for i, row in enumerate(b)}

    def __len__(self) -> int:
        return len(self.vis)

    def __getitem__(self, index: int) -> dict:
        return {"vis_embed": self.vis[str(index)], "text_embed": self.text[str(index)],
                "instance_id": str(index)}


def dataloader_rate(case: Case, a: np.ndarray, b: np.ndarray, rows_per_step: int,
                    device: torch.device) -> float:
    method, config = _method(case, device)
    loader = torch.utils.data.DataLoader(
        FeaturePairs(a, b), batch_size=rows_per_step, shuffle=True, drop_last=True,
        num_workers=0, pin_memory=device.type == "cuda")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for batch in loader:
                yield (batch["vis_embed"].to(device, non_blocking=True),
                       batch["text_embed"].to(device, non_blocking=True))

    return _timed(batches(), _step_fn(method, config, device), device, rows_per_step)


def pure_rate(case: Case, a: np.ndarray, b: np.ndarray, rows_per_step: int,
              device: torch.device) -> float:
    method, config = _method(case, device)
    dtype = storage_dtype(device)
    blocks = [(to_device(a[i * rows_per_step:(i + 1) * rows_per_step], device, dtype),
               to_device(b[i * rows_per_step:(i + 1) * rows_per_step], device, dtype))
              for i in range(min(4, a.shape[0] // rows_per_step))]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from blocks

    return _timed(batches(), _step_fn(method, config, device), device, rows_per_step)


def fit_rate(case: Case, a_path: Path, b_path: Path, out: Path,
             device: torch.device) -> tuple[FitSummary, float]:
    """fit's summary and its best epoch rate (one epoch = one window; the first warms up)."""
    from alignpipe.fit import fit, read_metrics

    overrides = {**case.config, "batch_size": case.batch, "epochs": ROUNDS + 1,
                 "warmup_steps": 1}
    summary = fit(a_path, b_path, method=case.method, out=out, overrides=overrides,
                  device=device, progress=False)
    return summary, max(m["pairs_per_s"] for m in read_metrics(out)[1:])


def matmul_tflops(device: torch.device, size: int = 4096) -> float:
    """Dense matmul rate of this device in the dtype training computes in."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(size, size, device=device, dtype=dtype)
    x @ x
    _sync(device)
    repeats = 20 if device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(repeats):
        x @ x
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def device_peak(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, f"given peak {given:g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16_TFLOPS.items():
            if key in name:
                return peak, f"{key} bf16 dense spec {peak:g} TFLOP/s"
    return None, ""


# ---- the benchmark ------------------------------------------------------------------------------
def bench_case(case: Case, device: torch.device, peak: float | None, peak_note: str) -> list[dict]:
    fitted = loader = pure = 0.0
    method, _ = _method(case, device)
    with tempfile.TemporaryDirectory(prefix="alignpipe-bench-fit-") as tmp:
        folder = Path(tmp)
        a_path, b_path = _write_stores(folder, case)
        a = open_store(a_path).read(slice(0, case.rows))
        b = open_store(b_path).read(slice(0, case.rows))
        for turn in range(PASSES):
            summary, rate = fit_rate(case, a_path, b_path, folder / f"run{turn}", device)
            rows_per_step = summary.batch_size * method.rows_per_pair
            fitted = max(fitted, rate)
            loader = max(loader, dataloader_rate(case, a, b, rows_per_step, device))
            pure = max(pure, pure_rate(case, a, b, rows_per_step, device))
    flops = method.step_flops(summary.batch_size)
    achieved = flops * fitted / rows_per_step / 1e12
    label = f"{case.name}, B={summary.batch_size}, dims {case.dims[0]}/{case.dims[1]}"
    rows = [
        {"name": f"{label}: fit loop", "value": fitted, "unit": "pairs/s"},
        {"name": f"{label}: DataLoader loop (FuseMix way)", "value": loader, "unit": "pairs/s"},
        {"name": f"{label}: pure compute", "value": pure, "unit": "pairs/s"},
        {"name": f"{label}: fit / DataLoader", "value": fitted / loader, "unit": "×"},
        {"name": f"{label}: fit / pure compute", "value": fitted / pure, "unit": "×"},
        {"name": f"{label}: model FLOPs per step", "value": flops / 1e9, "unit": "GFLOP"},
        {"name": f"{label}: achieved", "value": achieved, "unit": "TFLOP/s"},
    ]
    if peak:
        rows.append({"name": f"{label}: MFU vs {peak_note}", "value": 100 * achieved / peak,
                     "unit": "%"})
    return rows


def fusemix_projection(achieved_tflops: float) -> list[dict]:
    """FLOPs of the paper's schedule and its time at a measured rate."""
    from alignpipe.fit import resolve_config

    method = create_method("fusemix", resolve_config("fusemix"), *FUSEMIX_SCHEDULE["dims"])
    per_step = method.step_flops(FUSEMIX_SCHEDULE["batch"])
    total = per_step * FUSEMIX_SCHEDULE["steps"]
    return [
        {"name": "FuseMix schedule: model FLOPs per step (B=20480, 1536/1024, 4 blocks)",
         "value": per_step / 1e12, "unit": "TFLOP"},
        {"name": "FuseMix schedule: projected time at the achieved rate above (62k steps)",
         "value": total / (achieved_tflops * 1e12) / 3600, "unit": "hours"},
    ]


def run_fit_bench(device: str | None = None, quick: bool = False, method: str = "fusemix",
                  rows: int | None = None, batch_size: int | None = None,
                  dims: tuple[int, int] | None = None,
                  peak_tflops: float | None = None) -> list[dict]:
    """Benchmark rows {name, value, unit}; see the module docstring."""
    dev = resolve_device(device)
    if rows or batch_size or dims:
        base = default_cases(dev, quick)[0]
        cases = [Case(f"{method} custom", method, dims or base.dims, rows or base.rows,
                      batch_size or base.batch)]
    else:
        cases = default_cases(dev, quick)
    peak, note = device_peak(dev, peak_tflops)
    out = [{"name": f"device: {_device_name(dev)}", "value": torch.get_num_threads(),
            "unit": "threads"},
           {"name": "dense matmul rate (4096², training dtype)", "value": matmul_tflops(dev),
            "unit": "TFLOP/s"}]
    for case in cases:
        out += bench_case(case, dev, peak, note)
    achieved = next(r["value"] for r in out if r["name"].endswith(": achieved"))
    return out + fusemix_projection(achieved)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---- quality: methods × training-set sizes on the synthetic benchmark ---------------------------
QUALITY_METHODS = ("linear", "mlp", "fusemix", "asif")
QUALITY_TEST, QUALITY_VAL = 1000, 500


def quality_overrides(method: str, train: int) -> dict:
    """The same budget for every trained method: about 1,500 steps at B = 256."""
    if method == "asif":
        return {"topk": min(800, train)}
    rows_per_step = min(train, 256 * (2 if method == "fusemix" else 1))
    epochs = max(1, round(1500 * rows_per_step / train))
    return {"epochs": epochs, "batch_size": 256, "warmup_steps": 100, "out_dim": 128,
            "seed": 0, "val_every": max(1, epochs // 15)}


def run_quality(sizes: list[int], methods: Sequence[str] = QUALITY_METHODS,
                device: str | None = None, folder: str | Path | None = None,
                echo: Callable[[str], None] = print) -> str:
    """Test R@1/R@5 (mean of both directions) per method and training size, as markdown."""
    from alignpipe.app.render import CurvesPNG, markdown_table
    from alignpipe.app.results import eval_retrieval
    from alignpipe.app.synthetic import make_synthetic
    from alignpipe.fit import fit

    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="alignpipe-quality-") as tmp:
        root = Path(folder or tmp)
        for size in sizes:
            data = make_synthetic(root / f"n{size}", train=size, val=QUALITY_VAL,
                                  test=QUALITY_TEST, seed=0)
            for method in methods:
                out = root / f"n{size}" / "runs" / method
                fit(data.store_a, data.store_b, method=method, out=out, device=device,
                    overrides=quality_overrides(method, size), progress=False, overwrite=True,
                    callbacks=[CurvesPNG()])  # --folder keeps the runs, curves included
                r = eval_retrieval(out, data.store_a, data.store_b, split="test", device=device)
                results[(method, size)] = {k: (r["image_to_text"][k] + r["text_to_image"][k]) / 2
                                           for k in ("R@1", "R@5")}
                echo(f"n={size} {method}: R@1 {results[(method, size)]['R@1']:.1f} "
                     f"R@5 {results[(method, size)]['R@5']:.1f}")
    header = ["method", *[f"{s:,} pairs R@1 / R@5" for s in sizes]]
    rows = [[m, *[f"{results[(m, s)]['R@1']:.1f} / {results[(m, s)]['R@5']:.1f}" for s in sizes]]
            for m in methods]
    chance = 100 / QUALITY_TEST
    return (markdown_table(header, rows) + f"\n\nSynthetic benchmark, test split of "
            f"{QUALITY_TEST} items (chance R@1 {chance:.1f}%, R@5 {5 * chance:.1f}%); recall is "
            f"the mean of both directions, in percent.")


def main_quality(argv: list[str]) -> int:
    sizes = [int(s) for s in (argv[0] if argv else "500,2000,10000").split(",")]
    print(run_quality(sizes))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main_quality(sys.argv[1:]))
