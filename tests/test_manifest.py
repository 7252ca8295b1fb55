"""Manifest reading and validation: every rule has a test that asserts its message."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.data.manifest import read_manifest
from alignpipe.util.errors import ManifestError


def write(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_reads_checked_in_toy(toy_dir):
    m = read_manifest(toy_dir / "toy.parquet")
    assert m.rows == 600
    assert m.media_columns == ["image", "text", "audio"]
    assert m.media_paths("image")[0] == toy_dir / "images/000/000000.png"
    assert all(p.exists() for p in m.media_paths("audio"))
    assert len(m.split_rows("train")) + len(m.split_rows("val")) + len(m.split_rows("test")) == 600


def test_missing_id_column(tmp_path):
    path = write(tmp_path / "m.parquet", {"text": ["a"]})
    with pytest.raises(ManifestError, match=r"missing required column 'id'"):
        read_manifest(path)


def test_no_media_column(tmp_path):
    path = write(tmp_path / "m.parquet", {"id": ["a"], "label": ["x"]})
    with pytest.raises(ManifestError, match=r"no media column.*image, text, audio"):
        read_manifest(path)


def test_duplicate_ids_name_both_rows(tmp_path):
    path = write(tmp_path / "m.parquet", {"id": ["a", "b", "a", "c"], "text": ["1", "2", "3", "4"]})
    with pytest.raises(ManifestError, match=r"duplicate ids.*row 2 repeats row 0 \('a'\)"):
        read_manifest(path)


def test_empty_ids_named_by_row(tmp_path):
    path = write(tmp_path / "m.parquet", {"id": ["a", "", None, "d"], "text": list("wxyz")})
    with pytest.raises(ManifestError, match=r"empty id in column 'id' at rows 1, 2$"):
        read_manifest(path)


def test_unknown_split_value(tmp_path):
    path = write(tmp_path / "m.parquet", {"id": ["a", "b", "c"], "text": ["1", "2", "3"],
                                           "split": ["train", "validation", "tset"]})
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    message = str(err.value)
    assert "'tset', 'validation'" in message and "column 'split' at rows 1, 2" in message
    assert "allowed: train, val, test" in message


def test_unreadable_manifest(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(ManifestError, match=r"m\.parquet: cannot read manifest as parquet"):
        read_manifest(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.parquet")
    other = tmp_path / "m.xlsx"
    other.write_text("x")
    with pytest.raises(ManifestError, match=r"unknown manifest format '\.xlsx'"):
        read_manifest(other)


def test_csv_tsv_jsonl_are_converted(tmp_path):
    (tmp_path / "m.csv").write_text("id,text,label\n0001,a cat,cat\n0002,\"a dog, running\",dog\n")
    (tmp_path / "m.tsv").write_text("id\ttext\n0001\ta cat\n")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t})
                                                for i, t in [(1, "x"), (2, "y")]))
    csv = read_manifest(tmp_path / "m.csv")
    assert csv.ids == ["0001", "0002"]  # ids stay strings: leading zeros kept
    assert csv.column("text")[1] == "a dog, running"
    assert read_manifest(tmp_path / "m.tsv").column("text") == ["a cat"]
    assert read_manifest(tmp_path / "m.jsonl").ids == ["1", "2"]


def test_sha_changes_with_row_order(tmp_path):
    a = read_manifest(write(tmp_path / "a.parquet", {"id": ["x", "y"], "text": ["1", "2"]}))
    b = read_manifest(write(tmp_path / "b.parquet", {"id": ["y", "x"], "text": ["2", "1"]}))
    assert a.sha256 != b.sha256
