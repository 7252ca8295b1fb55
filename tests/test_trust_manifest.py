"""Issue 8, items 19 and 28 (manifest part): manifests keep the strings that are in the file,
malformed files are one-line errors naming the line or column, blank text counts as empty, and
builders assign seeded, exact, reproducible train/val/test splits."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data.builders import (
    SplitPlan,
    build_audiocaps,
    build_cc3m,
    build_folder,
    build_split,
)
from alignpipe.data.builders._common import (
    assign_splits,
    item_groups,
    parse_fractions,
    split_counts,
)
from alignpipe.data.manifest import is_blank_text, read_manifest
from alignpipe.util.errors import ManifestError

NULL_WORDS = ["NA", "null", "nan", "N/A", "NULL", "#N/A"]


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- item 19: strings stay strings ---------------------------------------------------------------
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_and_tsv_cells_are_the_strings_in_the_file(tmp_path, bom, sep):
    ids = ["000123", "0001", "1", *NULL_WORDS]
    texts = ["007", *NULL_WORDS, "1e3", "TRUE"]
    body = sep.join(["id", "text"]) + "\n" + "".join(
        f"{i}{sep}{t}\n" for i, t in zip(ids, texts, strict=True))
    path = write_bytes(tmp_path / ("m.csv" if sep == "," else "m.tsv"), bom + body.encode())
    m = read_manifest(path)
    assert m.columns == ["id", "text"]  # the BOM is not part of the first column's name
    assert m.ids == ids  # 0001 and 1 are two ids; NA is an id like any other
    assert m.column("text") == texts


def test_csv_empty_cell_is_null_and_other_columns_stay_text(tmp_path):
    path = write_bytes(tmp_path / "m.csv", b"id,text,label,score\na,,NA,0.50\nb,x,,1\n")
    m = read_manifest(path)
    assert m.column("text") == [None, "x"]
    assert m.column("label") == ["NA", None]
    assert m.column("score") == ["0.50", "1"]


def test_unterminated_quote_is_an_error_naming_its_line(tmp_path):
    path = write_bytes(tmp_path / "m.csv", b'id,text\na,fine\nb,"never closed\nc,swallowed\n')
    with pytest.raises(ManifestError, match=r"m\.csv:3: malformed CSV: .*never closed"):
        read_manifest(path)


def test_stray_quote_and_ragged_rows_name_the_line(tmp_path):
    stray = write_bytes(tmp_path / "s.csv", b'id,text\na,ok\nb,"x" y\n')
    with pytest.raises(ManifestError, match=r"s\.csv:3: malformed CSV"):
        read_manifest(stray)
    ragged = write_bytes(tmp_path / "r.csv", b"id,text\na,ok\nb,one, two\n")
    with pytest.raises(ManifestError, match=r"r\.csv:3: malformed CSV: 3 field\(s\) where the "
                                            r"header has 2"):
        read_manifest(ragged)
    # A quoted caption may span lines (that is valid CSV); the next row keeps its own line.
    multi = write_bytes(tmp_path / "ok.csv", b'id,text\na,"two\nlines"\nb,x\n')
    assert read_manifest(multi).column("text") == ["two\nlines", "x"]


def test_not_utf8_csv_names_the_line(tmp_path):
    path = write_bytes(tmp_path / "m.csv", b"id,text\na,ok\nb,caf\xe9\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: not UTF-8 text"):
        read_manifest(path)


def test_two_id_columns_are_refused(tmp_path):
    path = write_bytes(tmp_path / "m.csv", b"id,text,id\na,x,b\n")
    with pytest.raises(ManifestError, match=r"m\.csv: column 'id' appears more than once"):
        read_manifest(path)
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["b"])],
                                 names=["id", "text", "id"])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"column 'id' appears more than once"):
        read_manifest(tmp_path / "m.parquet")


def test_jsonl_keeps_strings_and_refuses_values_that_are_not_text(tmp_path):
    good = tmp_path / "m.jsonl"
    good.write_text('\ufeff{"id": "000123", "text": "007"}\n\n{"id": 7, "text": "NA"}\n',
                    encoding="utf-8")
    m = read_manifest(good)
    assert m.ids == ["000123", "7"] and m.column("text") == ["007", "NA"]
    floats = tmp_path / "f.jsonl"
    floats.write_text('{"id": "a", "text": "x"}\n{"id": 1.0, "text": "y"}\n')
    with pytest.raises(ManifestError, match=r"f\.jsonl:2: column 'id' holds 1\.0 \(float\)"):
        read_manifest(floats)  # it used to become the id "1"
    boolean = tmp_path / "b.jsonl"
    boolean.write_text('{"id": "a", "text": true}\n')
    with pytest.raises(ManifestError, match=r"b\.jsonl:1: column 'text' holds true"):
        read_manifest(boolean)
    twice = tmp_path / "d.jsonl"
    twice.write_text('{"id": "a", "text": "x", "id": "b"}\n')
    with pytest.raises(ManifestError, match=r"d\.jsonl:1: .*'id' appears twice"):
        read_manifest(twice)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"id": "a", "text": "x"}]))
    with pytest.raises(ManifestError, match=r"one JSON object per line"):
        read_manifest(array)


def test_parquet_columns_that_are_not_text_are_one_line_errors(tmp_path):
    def write(name: str, **columns) -> Path:
        pq.write_table(pa.table(columns), tmp_path / name)
        return tmp_path / name

    bad_utf8 = write("b.parquet", id=["a", "b", "c"],
                     text=pa.array([b"ok", b"fine", b"\xff\xfe"], pa.binary()))
    with pytest.raises(ManifestError, match=r"b\.parquet: column 'text' holds bytes that are "
                                            r"not UTF-8 text at row 2"):
        read_manifest(bad_utf8)
    list_ids = write("l.parquet", id=[["a"], ["b"]], text=["x", "y"])
    with pytest.raises(ManifestError, match=r"l\.parquet: column 'id' holds list<"):
        read_manifest(list_ids)
    struct = write("s.parquet", id=["a", "b"], text=[{"q": 1}, {"q": 2}])
    with pytest.raises(ManifestError, match=r"s\.parquet: column 'text' holds struct<"):
        read_manifest(struct)
    floats = write("f.parquet", id=[1.0, 2.0], text=["x", "y"])
    with pytest.raises(ManifestError, match=r"column 'id' holds double"):
        read_manifest(floats)
    # What converts without loss still reads: UTF-8 bytes, integers, dictionary-encoded text.
    fine = write("ok.parquet", id=pa.array([1, 2]), text=pa.array([b"a", b"b"], pa.binary()),
                 label=pa.array(["x", "y"]).dictionary_encode(),
                 class_id=pa.array([5, 6], pa.int32()))
    m = read_manifest(fine)
    assert (m.ids, m.column("text"), m.column("label"), m.column("class_id")) == (
        ["1", "2"], ["a", "b"], ["x", "y"], ["5", "6"])


BLANK = ["", " \t\n", "\x00", "\x00\x00", "\u200b", "\ufeff", "\u200b\u200c\u200d\u2060 ", None]


@pytest.mark.parametrize("value", BLANK)
def test_blank_text_is_empty(value):
    from alignpipe.data.media import MediaError
    from alignpipe.encoders.text import HFTextEncoder

    assert is_blank_text(value)
    with pytest.raises(MediaError, match="empty text"):
        HFTextEncoder.prepare(SimpleNamespace(prefix=""), value)


@pytest.mark.parametrize("value", ["a", "\u200ba", "0", "\x00x", "日本"])
def test_text_with_content_is_not_blank(value):
    assert not is_blank_text(value)


def test_embed_plan_marks_blank_text_as_empty_text(tmp_path):
    from alignpipe.embed.plan import plan_unit

    texts = ["a cat", "\x00", "\u200b\u200b", "\ufeff", "", "a dog"]
    pq.write_table(pa.table({"id": [str(i) for i in range(6)], "text": texts}),
                   tmp_path / "m.parquet")
    plan = plan_unit(read_manifest(tmp_path / "m.parquet"), "text", "text", 0, 0, 6, None)
    assert plan.row_reason == {1: "empty text", 2: "empty text", 3: "empty text",
                               4: "empty text"}
    assert plan.values == ["a cat", "a dog"]


def test_builders_treat_blank_captions_as_missing_and_keep_csv_quotes_strict(tmp_path):
    folder = tmp_path / "f"
    for name, caption in [("a", "a cat"), ("b", "\u200b\u200b")]:
        write_bytes(folder / f"{name}.jpg", b"x")
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    with pytest.raises(ManifestError, match=r"1 media file\(s\) have no \(or an empty\)"):
        build_folder(folder, tmp_path / "m.parquet")
    write_bytes(tmp_path / "x.jpg", b"x")
    table = write_bytes(tmp_path / "pairs.csv",
                        b'caption,image\n"never closed,x.jpg\nsecond,x.jpg\n')
    with pytest.raises(ManifestError, match=r"pairs\.csv:2: malformed CSV.*never closed"):
        build_cc3m(table, tmp_path / "m.parquet")
    shifted = write_bytes(tmp_path / "shift.csv", b"caption,image\na, comma,x.jpg\n")
    with pytest.raises(ManifestError, match=r"shift\.csv:2: 3 fields where the header has 2"):
        build_cc3m(shifted, tmp_path / "m.parquet")
    caps = write_bytes(tmp_path / "ac" / "train.csv",
                       b"audiocap_id,youtube_id,start_time,caption\n1,yt,0,a dog, barking\n")
    with pytest.raises(ManifestError, match=r"train\.csv:2: 5 fields where the header has 4"):
        build_audiocaps(caps, tmp_path / "m.parquet", check="off")  # caption cut at the comma


def test_builders_refuse_a_column_named_twice(tmp_path):
    write_bytes(tmp_path / "x.jpg", b"x")
    table = write_bytes(tmp_path / "pairs.csv", b"key,caption,image,key\n1,a cat,x.jpg,2\n")
    with pytest.raises(ManifestError, match=r"pairs\.csv: column 'key' appears more than once"):
        build_cc3m(table, tmp_path / "m.parquet", id_column="key")
    tsv = write_bytes(tmp_path / "pairs.tsv", b"caption\timage\tcaption\na cat\tx.jpg\tb\n")
    with pytest.raises(ManifestError, match=r"column 'caption' appears more than once"):
        build_cc3m(tsv, tmp_path / "m.parquet")
    caps = write_bytes(tmp_path / "ac" / "train.csv",
                       b"audiocap_id,youtube_id,start_time,caption,caption\n1,yt,0,a,b\n")
    with pytest.raises(ManifestError, match=r"train\.csv: column 'caption' appears more than"):
        build_audiocaps(caps, tmp_path / "m.parquet", check="off")
    assert not (tmp_path / "m.parquet").exists()


# ---- item 28: seeded splits ----------------------------------------------------------------------
def media_folder(root: Path, n: int) -> Path:
    for i in range(n):
        write_bytes(root / f"{i:03d}.jpg", b"x")
        (root / f"{i:03d}.txt").write_text(f"caption {i}")
    return root


def test_split_counts_are_exact_and_sum_to_the_items():
    for fractions in ["0.8,0.1,0.1", "0.7,0.2,0.1", "1/3,1/3,1/3", "0.9,0.1", "0,0,1"]:
        parsed = parse_fractions(fractions)
        for items in range(60):
            counts = split_counts(items, parsed)
            assert sum(counts) == items
            assert all(abs(c - items * f) < 1 for c, f in zip(counts, parsed, strict=True))
    assert split_counts(20, parse_fractions("0.8,0.1,0.1")) == [16, 2, 2]
    assert parse_fractions([0.7, 0.2, 0.1]) == (Fraction(7, 10), Fraction(1, 5), Fraction(1, 10))


@pytest.mark.parametrize("spec, message", [
    ("0.8,0.3,0.1", "must sum to 1, these sum to 1.2"),
    ("0.5,0.4", "must sum to 1"),
    ("1.2,-0.1,-0.1", "cannot be negative"),
    ("0.8,x,0.2", "'x' is not a number"),
    ("1", "give train,val,test fractions"),
    ("0.5,0.2,0.2,0.1", "give train,val,test fractions"),
])
def test_bad_fractions_are_refused(spec, message):
    with pytest.raises(ManifestError, match=message):
        parse_fractions(spec)


def test_assignment_is_seeded_and_independent_of_row_order():
    ids = [f"img{i:04d}" for i in range(200)]
    fractions = parse_fractions("0.8,0.1,0.1")
    first = dict(zip(ids, assign_splits(ids, fractions, seed=7), strict=True))
    again = dict(zip(ids, assign_splits(ids, fractions, seed=7), strict=True))
    backwards = dict(zip(ids[::-1], assign_splits(ids[::-1], fractions, seed=7), strict=True))
    other = dict(zip(ids, assign_splits(ids, fractions, seed=8), strict=True))
    assert first == again == backwards
    assert first != other
    assert Counter(first.values()) == Counter(other.values()) == {"train": 160, "val": 20,
                                                                  "test": 20}
    # Not a block of consecutive rows: the test split is spread over the row order.
    test_rows = [i for i, x in enumerate(ids) if first[x] == "test"]
    assert max(test_rows) - min(test_rows) > 100


def test_rows_sharing_media_stay_in_one_split():
    images = [f"img{i // 5}.jpg" for i in range(100)]  # five captions per image
    ids = [f"{img}#{i % 5}" for i, img in enumerate(images)]
    groups = item_groups(ids, [images])
    splits = assign_splits(ids, parse_fractions("0.6,0.2,0.2"), 0, groups)
    per_image: dict[str, set] = {}
    for img, split in zip(images, splits, strict=True):
        per_image.setdefault(img, set()).add(split)
    assert all(len(s) == 1 for s in per_image.values())
    assert Counter(splits) == {"train": 60, "val": 20, "test": 20}


def test_folder_builder_assigns_seeded_splits(tmp_path):
    root = media_folder(tmp_path / "data", 20)
    plan = SplitPlan.parse("0.8,0.1,0.1", seed=3)
    a = build_folder(root, tmp_path / "a.parquet", split_plan=plan)
    b = build_folder(root, tmp_path / "b.parquet", split_plan=plan)
    assert a.splits == {"train": 16, "val": 2, "test": 2}
    assert "seed 3" in a.summary()
    ma, mb = read_manifest(a.path), read_manifest(b.path)
    assert ma.column("split") == mb.column("split") and ma.sha256 == mb.sha256
    c = build_folder(root, tmp_path / "c.parquet", split_plan=SplitPlan.parse("0.8,0.1,0.1", 4))
    assert read_manifest(c.path).column("split") != ma.column("split")
    with pytest.raises(ManifestError, match="--split .* or --split-fractions, not both"):
        build_folder(root, tmp_path / "d.parquet", split="train", split_plan=plan)


def test_tiny_data_says_which_split_got_no_rows(tmp_path):
    root = media_folder(tmp_path / "data", 4)
    result = build_folder(root, tmp_path / "m.parquet", split_plan=SplitPlan.parse("0.8,0.1,0.1"))
    assert sum(result.splits.values()) == 4
    assert "got no rows" in result.summary()


def test_split_command_keeps_an_existing_split_unless_overridden(tmp_path):
    src = tmp_path / "m.csv"
    src.write_text("id,text,split\n" + "".join(f"{i:03d},t{i},test\n" for i in range(10)))
    kept = build_split(src, tmp_path / "kept.parquet", SplitPlan.parse("0.5,0.5"))
    assert read_manifest(kept.path).column("split") == ["test"] * 10
    assert "kept the existing split column" in kept.summary()
    new = build_split(src, tmp_path / "new.parquet", SplitPlan.parse("0.5,0.5", override=True))
    m = read_manifest(new.path)
    assert Counter(m.column("split")) == {"train": 5, "val": 5}
    assert m.ids == [f"{i:03d}" for i in range(10)]  # row order and ids kept
    assert "replaced the existing split column" in new.summary()


def test_cli_split_fractions(tmp_path):
    root = media_folder(tmp_path / "data", 10)
    runner = CliRunner()
    out = tmp_path / "m.parquet"
    result = runner.invoke(app, ["manifest", "folder", str(root), str(out),
                                 "--split-fractions", "0.6,0.2,0.2", "--split-seed", "1"])
    assert result.exit_code == 0, result.output
    assert Counter(read_manifest(out).column("split")) == {"train": 6, "val": 2, "test": 2}
    bad = runner.invoke(app, ["manifest", "folder", str(root), str(out),
                              "--split-fractions", "0.6,0.6,0.2"])
    assert bad.exit_code != 0 and "must sum to 1" in bad.output
    assert "Traceback" not in bad.output
    plain = tmp_path / "plain.parquet"
    assert runner.invoke(app, ["manifest", "folder", str(root), str(plain)]).exit_code == 0
    resplit = tmp_path / "split.parquet"
    result = runner.invoke(app, ["manifest", "split", str(plain), str(resplit),
                                 "--split-fractions", "0.6,0.2,0.2", "--split-seed", "1"])
    assert result.exit_code == 0, result.output
    # Same ids and seed: the same split as assigning it while building.
    assert read_manifest(resplit).column("split") == read_manifest(out).column("split")


# ---- item 17: a full disk while making the toy dataset -----------------------------------------
@pytest.mark.parametrize("fails", ["image", "audio"])
def test_a_full_disk_making_the_toy_data_names_the_file_and_a_rerun_makes_it(tmp_path,
                                                                             monkeypatch, fails):
    import errno

    from PIL import Image

    from alignpipe.app.toy import folder_digest, make_toy

    def full(*args, **kwargs):  # as PIL raises it: no file name in the error
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails == "image":
        monkeypatch.setattr(Image.Image, "save", full)
        where = tmp_path / "toy" / "images" / "000" / "000000.png"
    else:  # libsndfile says only "System error": the toy encodes in memory and writes bytes
        monkeypatch.setattr(Path, "write_bytes", full)
        where = tmp_path / "toy" / "audio" / "000" / "000000.wav"
    result = CliRunner().invoke(app, ["manifest", "toy", str(tmp_path / "toy"), "--rows", "4"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {where}: no space left on the device")
    monkeypatch.undo()
    assert CliRunner().invoke(app, ["manifest", "toy", str(tmp_path / "toy"), "--rows", "4"]
                         ).exit_code == 0
    make_toy(tmp_path / "ref", rows=4)
    assert folder_digest(tmp_path / "toy") == folder_digest(tmp_path / "ref")
