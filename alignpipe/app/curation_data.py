"""Pools for showing that curation works: the target classes are a minority among distractors.

- `make_synthetic_pool`: the synthetic benchmark (alignpipe/app/synthetic.py) with `targets` of
  its classes as the target set among `distractors` others, plus a concept store of the target
  classes' prompts and a target-only test store for zero-shot.
- the ``toy-pool`` manifest builder (``alignpipe manifest toy-pool OUT``): toy scenes (the toy
  set's 24 colour × shape classes, drawn and captioned as in alignpipe/app/toy.py) as a minority
  among scenes of other colours and shapes, with captions that name them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf
from PIL import Image, ImageDraw

import alignpipe.app.toy as toy
from alignpipe.app.synthetic import make_synthetic, write_store
from alignpipe.data.builders.registry import Option, register_builder
from alignpipe.data.manifest import read_manifest, write_manifest
from alignpipe.data.store import open_store
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import os_errors


# ---- the synthetic pool ---------------------------------------------------------------------
@dataclass
class SyntheticPool:
    manifest: Path
    store_a: Path          # pool, modality a (image)
    store_b: Path          # pool, modality b (text): what curation scores
    targets: Path          # concept store: the target classes' prompts, modality b
    target_test: Path      # target-class test rows, modality a (zero-shot queries)
    target_classes: list[str]


def make_synthetic_pool(out: str | Path, *, targets: int = 5, distractors: int = 25,
                        train: int = 4000, val: int = 500, test: int = 1500,
                        seed: int = 0) -> SyntheticPool:
    out = Path(out)
    data = make_synthetic(out, train=train, val=val, test=test, classes=targets + distractors,
                          seed=seed)
    wanted = set(data.classes[:targets])
    prompts = read_manifest(data.prompts_manifest)
    rows = [r for r, label in enumerate(prompts.column("label")) if label in wanted]
    table = pa.table({c: [prompts.column(c)[r] for r in rows] for c in ("id", "text", "label")})
    concept_manifest = write_manifest(table, out / "targets.parquet")
    latents = open_store(data.prompts_store).read(rows)
    concepts = write_store(out / "cache" / "targets" / "synthetic-b", latents, "text",
                           "synthetic-b", concept_manifest, None, seed)
    pool = read_manifest(data.manifest)
    test_rows = [r for r, (label, split) in enumerate(zip(pool.column("label"),
                                                          pool.column("split"), strict=True))
                 if label in wanted and split == "test"]
    table = pa.table({c: [pool.column(c)[r] for r in test_rows]
                      for c in ("id", "image", "text", "label", "split")})
    test_manifest = write_manifest(table, out / "target-test.parquet")
    query = write_store(out / "cache" / "target-test" / "synthetic-a",
                        open_store(data.store_a).read(test_rows), "image", "synthetic-a",
                        test_manifest, None, seed)
    return SyntheticPool(data.manifest, data.store_a, data.store_b, concepts.path, query.path,
                         sorted(wanted))


# ---- the toy pool ---------------------------------------------------------------------------
# Distractors: colours and shapes the toy set never shows (captions name them), with a tone and
# a beep count of their own, so a caption, a clip and a class still agree.
EXTRA_COLOURS = {  # name: (words, tone in Hz)
    "pink": (["pink", "rose", "salmon"], 311.0), "brown": (["brown", "chocolate", "tan"], 370.0),
    "cyan": (["cyan", "aqua", "turquoise"], 440.0), "black": (["black", "jet", "ebony"], 523.0),
    "teal": (["teal", "sea-green", "petrol"], 622.0), "lime": (["lime", "chartreuse", "neon"],
                                                              784.0),
    "maroon": (["maroon", "burgundy", "wine"], 880.0), "indigo": (["indigo", "ink", "denim"],
                                                                  988.0),
}
EXTRA_SHAPES = {  # name: (words, beeps)
    "star": (["star", "five-pointed star", "starburst"], 5),
    "ring": (["ring", "hoop", "donut"], 6),
    "diamond": (["diamond", "rhombus", "lozenge"], 7),
    "heart": (["heart", "heart shape", "valentine heart"], 8),
}


def _colour_words(colour: str) -> list[str]:
    return toy.COLOURS[colour][1] if colour in toy.COLOURS else EXTRA_COLOURS[colour][0]


def _shape_words(shape: str) -> list[str]:
    return toy.SHAPES[shape][0] if shape in toy.SHAPES else EXTRA_SHAPES[shape][0]


def _clip(colour: str, shape: str, size: str) -> np.ndarray:
    """toy.render_audio for the toy's classes; the same tone bursts for distractors."""
    if colour in toy.COLOURS and shape in toy.SHAPES:
        return toy.render_audio(toy.Scene(colour, shape, size, "centre", "white", (0, 0), "png"))
    n = int(toy.SAMPLE_RATE * toy.CLIP_SECONDS)
    t = np.arange(n) / toy.SAMPLE_RATE
    pitch = (toy.COLOURS[colour][2] if colour in toy.COLOURS else EXTRA_COLOURS[colour][1])
    beeps = toy.SHAPES[shape][1] if shape in toy.SHAPES else EXTRA_SHAPES[shape][1]
    slot = n // beeps
    envelope = np.zeros(n)
    for b in range(beeps):
        on = slice(b * slot, b * slot + int(slot * 0.7))
        envelope[on] = np.hanning(on.stop - on.start)
    amplitude = 0.8 if size == "large" else 0.4
    return (amplitude * np.sin(2 * np.pi * pitch * t) * envelope).astype(np.float32)


def _pool_image(colour: str, shape: str, scene: toy.Scene) -> Image.Image:
    """toy.render_image for the toy's classes; distractors drawn the same way."""
    if colour in toy.COLOURS and shape in toy.SHAPES:
        return toy.render_image(scene)
    image = Image.new("RGB", (toy.IMAGE_SIZE, toy.IMAGE_SIZE), toy.BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    rgb = toy.COLOURS[colour][0] if colour in toy.COLOURS else tuple(
        int(v) for v in np.frombuffer(colour.encode().ljust(3, b"\0")[:3], np.uint8))
    s, r = toy.IMAGE_SIZE, toy.IMAGE_SIZE * (0.14 if scene.size == "small" else 0.3)
    cx, cy = s / 2 + scene.jitter[0], s / 2 + scene.jitter[1]
    if shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=max(2, int(r / 3)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "star":
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * math.cos(math.pi / 2 + k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.sin(math.pi / 2 + k * math.pi / 5))
               for k in range(10)]
        draw.polygon(pts, fill=rgb)
    elif shape == "heart":
        draw.ellipse([cx - r, cy - r, cx, cy], fill=rgb)
        draw.ellipse([cx, cy - r, cx + r, cy], fill=rgb)
        draw.polygon([(cx - r, cy - r / 2), (cx + r, cy - r / 2), (cx, cy + r)], fill=rgb)
    else:  # a distractor colour on one of the toy's shapes
        fake = toy.Scene("red", shape, scene.size, "centre", scene.background, scene.jitter,
                         scene.fmt)
        image = toy.render_image(fake)
        data = np.asarray(image).copy()
        mask = np.all(data == toy.COLOURS["red"][0], axis=2)
        data[mask] = rgb
        image = Image.fromarray(data)
    return image


def make_toy_pool(out: str | Path, rows: int = 3000, target_fraction: float = 0.2,
                  seed: int = 0) -> Path:
    """A pool manifest (``pool.parquet``: id, image, audio, text, label, split) in which the
    toy's 24 classes are `target_fraction` of the rows and the rest are distractor classes
    (other colours, other shapes, or both), one caption per scene."""
    if rows < 1 or not 0.0 <= target_fraction <= 1.0:
        raise AlignpipeError("toy-pool: --rows must be ≥ 1 and --target-fraction in [0, 1]")
    out = Path(out)
    rng = np.random.default_rng(seed)
    colours = [*toy.COLOURS, *EXTRA_COLOURS]
    shapes = [*toy.SHAPES, *EXTRA_SHAPES]
    targets = [(c, s) for c in toy.COLOURS for s in toy.SHAPES]
    distractors = [(c, s) for c in colours for s in shapes if (c, s) not in set(targets)]
    columns: dict[str, list] = {k: [] for k in ("id", "image", "audio", "text", "label",
                                                 "split")}
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    for item in range(rows):
        pool = targets if rng.random() < target_fraction else distractors
        colour, shape = pool[rng.integers(len(pool))]
        size = pick(list(toy.SIZES))
        position = pick(list(toy.POSITIONS))
        background = pick(list(toy.BACKGROUNDS))
        scene = toy.Scene(colour if colour in toy.COLOURS else "red",
                          shape if shape in toy.SHAPES else "circle", size, position,
                          background, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))),
                          "png")
        text = pick(toy.CAPTION_TEMPLATES).format(
            size=pick(toy.SIZES[size]), colour=pick(_colour_words(colour)),
            shape=pick(_shape_words(shape)), position=pick(toy.POSITIONS[position]),
            background=background)
        image_rel = f"images/{item // 1000:03d}/{item:06d}.png"
        audio_rel = f"audio/{item // 1000:03d}/{item:06d}.wav"
        for rel in (image_rel, audio_rel):
            with os_errors(out / rel):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with os_errors(out / image_rel):
            _pool_image(colour, shape, scene).save(out / image_rel, format="PNG")
        clip = io.BytesIO()
        sf.write(clip, _clip(colour, shape, size), toy.SAMPLE_RATE, subtype="PCM_U8",
                 format="WAV")
        with os_errors(out / audio_rel):
            (out / audio_rel).write_bytes(clip.getvalue())
        columns["id"].append(f"pool-{item:06d}")
        columns["image"].append(image_rel)
        columns["audio"].append(audio_rel)
        columns["text"].append(text)
        columns["label"].append(f"{colour} {shape}")
        columns["split"].append("val" if rng.random() < 0.1 else "train")
    return write_manifest(pa.table(columns), out / "pool.parquet")


@register_builder("toy-pool", writes_folder=True, options=(
    Option("out", Path, positional=True, help="Output folder."),
    Option("rows", int, 3000, "Rows (one caption per scene)."),
    Option("target_fraction", float, 0.2, "Share of rows showing one of the toy's 24 classes."),
    Option("seed", int, 0, "Random seed; the same seed gives the same bytes.")))
def _toy_pool_builder(out: str | Path, rows: int, target_fraction: float, seed: int,
                      progress: bool = False) -> str:
    """A curation pool: the toy's 24 classes as a minority among distractor colours and shapes
    (``alignpipe manifest toy-pool``, ``make: {kind: toy-pool}``)."""
    path = make_toy_pool(out, rows=rows, target_fraction=target_fraction, seed=seed)
    return f"wrote {path} ({rows} rows, {target_fraction:.0%} of them the toy's classes)"
