"""A synthetic latent benchmark with a known answer: two modalities from one hidden variable.

Each item has a hidden vector ``z = μ_class + N(0, I)``. Modality a sees ``[z, u_a]`` and
modality b sees ``[z + caption noise, u_b]`` through *different* random two-layer tanh networks
into different dims, plus Gaussian noise; ``u_a``, ``u_b`` are private nuisance factors the other
side never sees (as an image encoder sees lighting a caption never mentions). Only ``z`` is
shared, so a method that recovers it aligns the two sides; chance R@1 is 1/test items.

``make_synthetic(out, train=2000)`` writes, under `out`::

    synthetic.parquet                     manifest: id, image, text, label, split
    prompts.parquet                       one row per (class, template), class in label
    cache/synthetic/synthetic-a           store of modality a (image by default)
    cache/synthetic/synthetic-b           store of modality b (text)
    cache/prompts/synthetic-b             prompts through modality b's map

``alignpipe bench fit --quality`` (= ``python -m alignpipe.app.benchmarks.fit``) prints the
methods × training-set sizes table of the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from alignpipe.data.manifest import SPLITS, read_manifest, write_manifest
from alignpipe.data.store import LatentStore, create_store


@dataclass
class SyntheticData:
    manifest: Path
    store_a: Path
    store_b: Path
    prompts_manifest: Path
    prompts_store: Path
    classes: list[str]


class _RandomNet:
    """A fixed random map R^in → R^out: out = W2 tanh(W1 x), about unit variance per output."""

    def __init__(self, rng: np.random.Generator, dim_in: int, dim_out: int, width: int) -> None:
        self.w1 = rng.standard_normal((dim_in, width)) * (1.5 / np.sqrt(dim_in))
        self.b1 = rng.standard_normal(width) * 0.3
        self.w2 = rng.standard_normal((width, dim_out)) / np.sqrt(width)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1 + self.b1) @ self.w2 * 2.0


def _latents(rng: np.random.Generator, net: _RandomNet, shared: np.ndarray, private: int,
             noise: float) -> np.ndarray:
    nuisance = rng.standard_normal((shared.shape[0], private))
    clean = net(np.concatenate([shared, nuisance], axis=1))
    return (clean + noise * rng.standard_normal(clean.shape)).astype(np.float32)


def write_store(path: Path, latents: np.ndarray, modality: str, name: str, manifest_path: Path,
                 invalid: list[int] | None = None, seed: int = 0) -> LatentStore:
    manifest = read_manifest(manifest_path)
    store = create_store(path, rows=latents.shape[0], dim=latents.shape[1],
                         encoder={"name": name, "backend": "synthetic", "model_id": None,
                                  "seed": seed},
                         modality=modality, manifest=manifest, overwrite=True)
    valid = np.ones(latents.shape[0], dtype=bool)
    valid[list(invalid or [])] = False
    for unit in range(store.n_units):
        start, stop = store.unit_range(unit)
        failures = [{"id": manifest.ids[r], "row": r, "column": modality,
                     "reason": "synthetic failure"} for r in range(start, stop) if not valid[r]]
        store.write_unit(unit, latents[start:stop], valid[start:stop], failures)
    return store


def make_synthetic(out: str | Path, *, train: int = 2000, val: int = 500, test: int = 1000,
                   dim_a: int = 256, dim_b: int = 192, hidden: int = 32, private: int = 16,
                   classes: int = 10, templates: int = 4, noise: float = 0.6,
                   caption_noise: float = 0.3, captions_per_item: int = 1,
                   modalities: tuple[str, str] = ("image", "text"), seed: int = 0,
                   invalid: dict[str, list[int]] | None = None,
                   split_column: bool = True) -> SyntheticData:
    """Write the benchmark's manifests and stores (items per split; rows = items × captions)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    net_a = _RandomNet(rng, hidden + private, dim_a, 4 * hidden)
    net_b = _RandomNet(rng, hidden + private, dim_b, 4 * hidden)
    centres = rng.standard_normal((classes, hidden)) * 1.5
    n_items = train + val + test
    label = rng.integers(classes, size=n_items)
    z = centres[label] + rng.standard_normal((n_items, hidden))
    item_latents = _latents(rng, net_a, z, private, noise)
    item = np.repeat(np.arange(n_items), captions_per_item)
    caption_z = z[item] + caption_noise * rng.standard_normal((item.size, hidden))
    latents_a = item_latents[item]
    latents_b = _latents(rng, net_b, caption_z, private, noise)

    split = np.repeat(np.array(SPLITS), [train, val, test])[item]
    columns = {"id": [f"syn-{r:07d}" for r in range(item.size)],
               modalities[0]: [f"{modalities[0]}/{i:07d}" for i in item],
               modalities[1]: [f"{modalities[1]}/{r:07d}" for r in range(item.size)],
               "label": [f"class-{c:02d}" for c in label[item]]}
    if modalities[1] == "text":
        columns["text"] = [f"caption {r} of item {i}" for r, i in enumerate(item)]
    if split_column:
        columns["split"] = split.tolist()
    manifest = write_manifest(pa.table(columns), out / "synthetic.parquet")
    cache = out / "cache"
    invalid = invalid or {}
    store_a = write_store(cache / "synthetic" / "synthetic-a", latents_a, modalities[0],
                           "synthetic-a", manifest, invalid.get("a"), seed)
    store_b = write_store(cache / "synthetic" / "synthetic-b", latents_b, modalities[1],
                           "synthetic-b", manifest, invalid.get("b"), seed)

    # Prompts: class centres seen through modality b's map, one row per (class, template).
    names = [f"class-{c:02d}" for c in range(classes)]
    prompt_z = np.repeat(centres, templates, axis=0)
    prompt_z = prompt_z + caption_noise * rng.standard_normal(prompt_z.shape)
    prompts = write_manifest(pa.table({
        "id": [f"p{c:03d}-t{t}" for c in range(classes) for t in range(templates)],
        modalities[1]: [f"template {t} of {n}" for n in names for t in range(templates)],
        "label": [n for n in names for _ in range(templates)]}), out / "prompts.parquet")
    prompts_store = write_store(cache / "prompts" / "synthetic-b",
                                 _latents(rng, net_b, prompt_z, private, noise), modalities[1],
                                 "synthetic-b", prompts, None, seed)
    return SyntheticData(manifest, store_a.path, store_b.path, prompts, prompts_store.path, names)

