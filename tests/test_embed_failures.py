"""Bad rows never stop a run and are never silent: valid=false, a failure record, a count."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.data.manifest import write_manifest
from alignpipe.data.store import open_store
from alignpipe.embed import FailureRateError, embed

# scene k of the toy set: rows 2k and 2k+1, images/000/{k:06d}.png (k even) or .jpg (k odd)


def scene_rows(k: int) -> list[int]:
    return [2 * k, 2 * k + 1]


def image_of(toy: Path, k: int) -> Path:
    return toy / "images" / "000" / f"{k:06d}.{'png' if k % 2 == 0 else 'jpg'}"


def audio_of(toy: Path, k: int) -> Path:
    return toy / "audio" / "000" / f"{k:06d}.wav"


def failures_by_row(summary) -> dict[int, str]:
    table = pq.read_table(summary.failures_path).to_pylist()
    return {r["row"]: r["reason"] for r in table}


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "missing":
        path.unlink()
    elif kind == "unreadable":  # a folder where a file should be (root ignores chmod)
        path.unlink()
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())


IMAGE_DAMAGE = {3: "missing", 4: "unreadable", 5: "truncated", 6: "truncated", 7: "corrupt",
                8: "empty"}  # scene 6 is a PNG cut in half, scene 5 a JPEG
AUDIO_DAMAGE = {3: "missing", 4: "unreadable", 5: "truncated", 7: "corrupt", 8: "empty"}
EXPECTED = {"missing": "not found", "unreadable": "unreadable", "truncated": "truncated",
            "corrupt": "corrupt", "empty": "empty"}


@pytest.mark.parametrize("decoder", ["processes", "threads"])
def test_each_bad_image_kind_is_a_recorded_failure(toy_copy, tmp_path, monkeypatch, decoder):
    monkeypatch.setenv("ALIGNPIPE_DECODER", decoder)
    for k, kind in IMAGE_DAMAGE.items():
        damage(image_of(toy_copy, k), kind)
    summary = embed(toy_copy / "toy.parquet", "test-vit", tmp_path / "cache", progress=False,
                    max_failure_rate=0.05)
    store = open_store(summary.path)
    valid = store.read_valid()
    reasons = failures_by_row(summary)
    bad_rows = {r for k in IMAGE_DAMAGE for r in scene_rows(k)}
    assert set(np.flatnonzero(~valid)) == bad_rows
    assert set(reasons) == bad_rows
    for k, kind in IMAGE_DAMAGE.items():
        for row in scene_rows(k):
            assert EXPECTED[kind] in reasons[row], (kind, reasons[row])
            assert image_of(toy_copy, k).name in reasons[row]
    assert summary.failed == len(bad_rows) and summary.valid == 600 - len(bad_rows)
    assert np.all(store.read(sorted(bad_rows)) == 0)
    assert np.abs(store.read(np.flatnonzero(valid))).sum(axis=1).min() > 0


def test_each_bad_audio_kind_is_a_recorded_failure(toy_copy, tmp_path):
    for k, kind in AUDIO_DAMAGE.items():
        damage(audio_of(toy_copy, k), kind)
    summary = embed(toy_copy / "toy.parquet", "test-audio", tmp_path / "cache", progress=False,
                    max_failure_rate=0.05)
    reasons = failures_by_row(summary)
    bad_rows = {r for k in AUDIO_DAMAGE for r in scene_rows(k)}
    assert set(reasons) == bad_rows
    assert set(np.flatnonzero(~open_store(summary.path).read_valid())) == bad_rows
    for k, kind in AUDIO_DAMAGE.items():
        assert EXPECTED[kind] in reasons[2 * k], (kind, reasons[2 * k])


def test_empty_text_is_a_recorded_failure(toy_dir, tmp_path):
    table = pq.read_table(toy_dir / "toy.parquet")
    texts = table.column("text").to_pylist()
    texts[5], texts[9], texts[10] = "", None, "   "
    table = table.set_column(table.column_names.index("text"), "text", pa.array(texts))
    manifest = write_manifest(table, toy_dir / "toy-empty-text.parquet")
    summary = embed(manifest, "test-text", tmp_path / "cache", progress=False)
    reasons = failures_by_row(summary)
    assert reasons == {5: "empty text", 9: "empty text", 10: "empty text"}
    assert summary.failed == 3
    assert list(np.flatnonzero(~open_store(summary.path).read_valid())) == [5, 9, 10]


def test_missing_media_cell_is_a_failure_not_a_crash(toy_dir, tmp_path):
    table = pq.read_table(toy_dir / "toy.parquet")
    images = table.column("image").to_pylist()
    images[0] = None
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images))
    manifest = write_manifest(table, toy_dir / "toy-no-image.parquet")
    summary = embed(manifest, "test-vit", tmp_path / "cache", progress=False)
    assert failures_by_row(summary) == {0: "no image path in column 'image'"}
    assert open_store(summary.path).read_valid()[1]  # row 1 shares the image but names it


def _hang_on(name: str):
    from alignpipe.data import media

    real = media.open_image

    def slow(ref):
        if Path(str(ref)).name == name:
            time.sleep(60)
        return real(ref)

    return slow


@pytest.mark.parametrize("decoder", ["processes", "threads"])
def test_hung_decoder_times_out_and_the_run_finishes(toy_copy, tmp_path, monkeypatch, decoder):
    from alignpipe.encoders import vision

    monkeypatch.setenv("ALIGNPIPE_DECODER", decoder)
    monkeypatch.setattr(vision, "open_image", _hang_on("000004.png"))
    began = time.monotonic()
    summary = embed(toy_copy / "toy.parquet", "test-vit", tmp_path / "cache", progress=False,
                    decode_timeout=1.0, batch_size=16)
    assert time.monotonic() - began < 30
    reasons = failures_by_row(summary)
    assert set(reasons) == {8, 9}
    assert "longer than 1 s" in reasons[8]
    assert summary.valid == 598


def test_crashing_decoder_fails_its_item_only(toy_copy, tmp_path, monkeypatch):
    from alignpipe.encoders import vision

    real = vision.open_image

    def crash(ref):
        if Path(str(ref)).name == "000010.png":
            os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug in C looks like
        return real(ref)

    monkeypatch.setenv("ALIGNPIPE_DECODER", "processes")
    monkeypatch.setattr(vision, "open_image", crash)
    summary = embed(toy_copy / "toy.parquet", "test-vit", tmp_path / "cache", progress=False,
                    batch_size=16)
    reasons = failures_by_row(summary)
    assert set(reasons) == {20, 21}
    assert "crashed" in reasons[20]
    assert summary.valid == 598


def test_failure_rate_over_the_limit_raises_after_the_store_is_finished(toy_copy, tmp_path):
    for k in range(6):  # 12 of 600 rows = 2%
        image_of(toy_copy, k).unlink()
    with pytest.raises(FailureRateError) as caught:
        embed(toy_copy / "toy.parquet", "test-vit", tmp_path / "cache", progress=False)
    summary = caught.value.summary
    assert summary.failed == 12 and "2.00%" in str(caught.value)
    assert caught.value.exit_code != 0
    store = open_store(summary.path)
    assert store.complete and int(store.read_valid().sum()) == 588
    again = embed(toy_copy / "toy.parquet", "test-vit", tmp_path / "cache", progress=False,
                  max_failure_rate=0.05)
    assert again.skipped_units == again.units and again.failed == 12


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", None), ("OGG", "VORBIS"),
                                         ("MP3", "MPEG_LAYER_III")])
def test_audio_formats_decode_to_mono_at_the_model_rate(tmp_path, fmt, subtype):
    import soundfile as sf

    from alignpipe.data.media import MediaError, MediaRef, load_audio

    t = np.arange(8000) / 8000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 8000, format=fmt, subtype=subtype)
    wave = load_audio(MediaRef(path), 16000)
    assert wave.dtype == np.float32 and abs(len(wave) - 16000) < 1200  # mp3 adds padding
    assert 0.25 < np.abs(wave).max() < 0.4
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated|corrupt"):
        load_audio(MediaRef(path), 16000)
