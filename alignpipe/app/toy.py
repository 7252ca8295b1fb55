"""The toy dataset: a deterministic image–text–audio set made from a seed.

Each *scene* is one coloured shape on a plain background, rendered to a PNG or JPEG file, plus a
short WAV clip whose pitch follows the colour and whose rhythm (number of beeps) follows the
shape. Each scene has `captions_per_item` rows that share its image and audio but describe it in
different words, the way COCO and Flickr30K have several captions per image. ``label`` is the
colour×shape class; ``split`` is drawn per scene, so captions of one scene never straddle splits.

``alignpipe manifest toy OUT --rows 600`` writes ``OUT/toy.parquet`` (the manifest),
``OUT/prompts.parquet`` (class × template rows for zero-shot), ``OUT/images/`` and ``OUT/audio/``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf
from PIL import Image, ImageDraw

from alignpipe.data.builders.registry import Option, register_builder
from alignpipe.data.manifest import write_manifest
from alignpipe.util.errors import AlignpipeError
from alignpipe.util.fsutil import os_errors

COLOURS = {  # name: (RGB, words for it, tone in Hz)
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"], 262.0),
    "green": ((30, 160, 50), ["green", "emerald", "grass-green"], 330.0),
    "blue": ((30, 60, 210), ["blue", "navy", "cobalt"], 392.0),
    "yellow": ((235, 205, 20), ["yellow", "golden", "lemon"], 494.0),
    "purple": ((130, 40, 170), ["purple", "violet", "plum"], 587.0),
    "orange": ((245, 130, 20), ["orange", "tangerine", "amber"], 698.0),
}
SHAPES = {  # name: (words for it, beeps per clip)
    "circle": (["circle", "disc", "round dot"], 1),
    "square": (["square", "box", "block"], 2),
    "triangle": (["triangle", "wedge", "three-sided shape"], 3),
    "cross": (["cross", "plus sign", "x-shaped cross"], 4),
}
SIZES = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
POSITIONS = {
    "top": ["near the top", "at the top", "high up"],
    "bottom": ["near the bottom", "at the bottom", "low down"],
    "left": ["on the left", "at the left side", "towards the left"],
    "right": ["on the right", "at the right side", "towards the right"],
    "centre": ["in the middle", "in the centre", "right in the center"],
}
BACKGROUNDS = {
    "white": (245, 245, 245), "grey": (190, 190, 190), "beige": (235, 225, 200),
    "pale blue": (210, 225, 240), "pale green": (215, 235, 215), "dark": (50, 50, 55),
}
CAPTION_TEMPLATES = [
    "a {size} {colour} {shape}",
    "a {colour} {shape} {position}",
    "a {size} {colour} {shape} {position} on a {background} background",
    "{position}, a {colour} {shape}",
    "picture of a {size} {shape} coloured {colour}",
    "there is a {colour} {shape} {position}",
    "one {size} {shape}, {colour}, {position}",
    "a {background} canvas with a {colour} {shape}",
]
PROMPT_TEMPLATES = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image showing a {}.",
    "a simple picture of a {}.",
    "a {} on a plain background.",
]
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
IMAGE_SIZE = 64
SAMPLE_RATE = 8000
CLIP_SECONDS = 0.5


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    jitter: tuple[int, int]
    fmt: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene) -> None:
    s = IMAGE_SIZE
    radius = s * (0.14 if scene.size == "small" else 0.3)
    centres = {"top": (0.5, 0.25), "bottom": (0.5, 0.75), "left": (0.25, 0.5),
               "right": (0.75, 0.5), "centre": (0.5, 0.5)}
    fx, fy = centres[scene.position]
    cx, cy = fx * s + scene.jitter[0], fy * s + scene.jitter[1]
    fill = COLOURS[scene.colour][0]
    r = radius
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a))
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render_image(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    _draw_shape(ImageDraw.Draw(image), scene)
    return image


def render_audio(scene: Scene) -> np.ndarray:
    """A clip of `beeps` tone bursts at the colour's pitch; louder for large shapes."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    pitch = COLOURS[scene.colour][2]
    beeps = SHAPES[scene.shape][1]
    tone = np.sin(2 * np.pi * pitch * t)
    slot = n // beeps
    envelope = np.zeros(n)
    for b in range(beeps):
        on = slice(b * slot, b * slot + int(slot * 0.7))
        envelope[on] = np.hanning(on.stop - on.start)
    amplitude = 0.8 if scene.size == "large" else 0.4
    return (amplitude * tone * envelope).astype(np.float32)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    return template.format(
        size=pick(SIZES[scene.size]), colour=pick(COLOURS[scene.colour][1]),
        shape=pick(SHAPES[scene.shape][0]), position=pick(POSITIONS[scene.position]),
        background=scene.background)


def _scene(rng: np.random.Generator, item: int) -> Scene:
    def choice(options: Collection[str]) -> str:
        return list(options)[rng.integers(len(options))]

    return Scene(
        colour=choice(COLOURS), shape=choice(SHAPES), size=choice(SIZES),
        position=choice(POSITIONS), background=choice(BACKGROUNDS),
        jitter=(int(rng.integers(-4, 5)), int(rng.integers(-4, 5))),
        fmt="png" if item % 2 == 0 else "jpg")


def _split(rng: np.random.Generator) -> str:
    u = rng.random()
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


def make_toy(out: str | Path, rows: int = 600, seed: int = 0, captions_per_item: int = 2,
             progress: bool = False) -> dict[str, Path]:
    """Generate the toy dataset into `out`; the same arguments always give the same bytes."""
    if rows < 1:
        raise ValueError("rows must be ≥ 1")
    out = Path(out)
    rng = np.random.default_rng(seed)
    n_items = math.ceil(rows / captions_per_item)
    columns: dict[str, list] = {k: [] for k in ("id", "image", "text", "audio", "label", "split")}
    iterator = range(n_items)
    if progress:
        from rich.progress import track

        iterator = track(iterator, description="toy scenes", total=n_items)
    for item in iterator:
        scene = _scene(rng, item)
        split = _split(rng)
        folder = f"{item // 1000:03d}"
        image_rel = f"images/{folder}/{item:06d}.{scene.fmt}"
        audio_rel = f"audio/{folder}/{item:06d}.wav"
        for path in (out / image_rel, out / audio_rel):
            with os_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
        image = render_image(scene)
        # A full disk or read-only folder is one line naming the file (libsndfile's own error
        # says "System error"): encode in memory, write the bytes here. A rerun rewrites all.
        with os_errors(out / image_rel):
            if scene.fmt == "png":
                image.save(out / image_rel, format="PNG", optimize=True)
            else:
                image.save(out / image_rel, format="JPEG", quality=85)
        audio = io.BytesIO()
        sf.write(audio, render_audio(scene), SAMPLE_RATE, subtype="PCM_U8", format="WAV")
        with os_errors(out / audio_rel):
            (out / audio_rel).write_bytes(audio.getvalue())
        for k in range(captions_per_item):
            row = item * captions_per_item + k
            if row >= rows:
                break
            columns["id"].append(f"toy-{row:06d}")
            columns["image"].append(image_rel)
            columns["audio"].append(audio_rel)
            columns["text"].append(caption(scene, rng))
            columns["label"].append(scene.label)
            columns["split"].append(split)
    manifest = write_manifest(pa.table(columns), out / "toy.parquet")
    prompts = write_prompts(out / "prompts.parquet", class_names(), PROMPT_TEMPLATES)
    return {"manifest": manifest, "prompts": prompts}


def write_prompts(path: str | Path, classes: list[str], templates: list[str]) -> Path:
    """A prompts manifest: one row per (class, template), the class in ``label``."""
    ids, texts, labels = [], [], []
    for c, name in enumerate(classes):
        for t, template in enumerate(templates):
            ids.append(f"c{c:04d}-t{t:03d}")
            texts.append(template.format(name))
            labels.append(name)
    return write_manifest(pa.table({"id": ids, "text": texts, "label": labels}), path)


def folder_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and bytes (for determinism checks)."""
    digest = hashlib.sha256()
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@register_builder("toy", writes_folder=True, options=(
    Option("out", Path, positional=True, help="Output folder."),
    Option("rows", int, 600, "Rows (captions) to make."),
    Option("seed", int, 0, "Random seed; the same seed gives the same bytes."),
    Option("captions_per_item", int, 2, "Rows sharing one image and clip.")))
def _toy_builder(out: str | Path, rows: int, seed: int, captions_per_item: int,
                 progress: bool = False) -> str:
    """Generate the deterministic toy image–text–audio dataset (``alignpipe manifest toy``,
    ``make: {kind: toy}``)."""
    if rows < 1 or captions_per_item < 1:
        raise AlignpipeError("--rows and --captions-per-item must be at least 1")
    paths = make_toy(out, rows=rows, seed=seed, captions_per_item=captions_per_item,
                     progress=progress and rows > 5000)
    return f"wrote {paths['manifest']} ({rows} rows) and {paths['prompts']}"
