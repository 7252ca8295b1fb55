"""The toy generator is deterministic and its data is what the captions say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from alignpipe import read_manifest
from alignpipe.app.toy import COLOURS, SHAPES, folder_digest, make_toy

TOY = Path(__file__).resolve().parents[1] / "data_manifests" / "toy"  # the checked-in copy


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    make_toy(tmp_path / "a", rows=40, seed=3)
    make_toy(tmp_path / "b", rows=40, seed=3)
    make_toy(tmp_path / "c", rows=40, seed=4)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")


def test_checked_in_copy_is_what_the_generator_makes(tmp_path):
    make_toy(tmp_path / "toy", rows=600, seed=0)
    assert folder_digest(tmp_path / "toy") == folder_digest(TOY)


def test_media_follow_the_label(toy_dir):
    m = read_manifest(toy_dir / "toy.parquet")
    row = 0
    colour, shape = m.column("label")[row].split()
    image = np.asarray(Image.open(m.media_paths("image")[row]).convert("RGB")).reshape(-1, 3)
    target = np.array(COLOURS[colour][0])
    assert (np.abs(image.astype(int) - target).sum(axis=1) < 60).mean() > 0.01
    clip, rate = sf.read(m.media_paths("audio")[row])
    spectrum = np.abs(np.fft.rfft(clip))
    peak_hz = np.argmax(spectrum) * rate / len(clip)
    assert abs(peak_hz - COLOURS[colour][2]) < 5
    envelope = np.convolve(np.abs(clip), np.ones(80) / 80, mode="same")  # 10 ms smoothing
    bursts = np.diff((envelope > 0.05).astype(int)) == 1
    assert bursts.sum() == SHAPES[shape][1]
    assert set(m.column("split")) == {"train", "val", "test"}
    # rows of one scene share image, audio and split
    assert m.column("image")[0] == m.column("image")[1]
    assert m.column("split")[0] == m.column("split")[1]
