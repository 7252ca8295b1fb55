"""Manifest builders: each runs on a tiny fake copy of its dataset's layout written here."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.data.builders import (
    build_audiocaps,
    build_cc3m,
    build_clotho,
    build_folder,
    build_imagenet,
    build_karpathy,
    build_prompts,
    build_webdataset,
    expand_braces,
    imagenet_classes,
    imagenet_wnids,
    read_templates,
    templates,
)
from alignpipe.data.builders._common import media_cell
from alignpipe.data.manifest import Manifest, read_manifest
from alignpipe.util.errors import ManifestError

runner = CliRunner()


# ---- fake media ---------------------------------------------------------------------------------
def jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 20, 20)).save(path, format="JPEG")
    return path


def wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(80, dtype=np.float32), 8000)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cells_resolve(manifest: Manifest, column: str) -> bool:
    """Every media cell names a file on disk (the archive, for ARCHIVE::MEMBER cells)."""
    paths = [manifest.resolve(c.split("::", 1)[0]) for c in manifest.column(column)]
    return all(p is not None and p.is_file() for p in paths)


# ---- shipped data -------------------------------------------------------------------------------
def test_imagenet_classes_are_the_1000_in_sorted_wnid_order():
    classes = imagenet_classes()
    wnids = [w for w, _ in classes]
    names = [n for _, n in classes]
    assert len(classes) == 1000 and len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert all(n.strip() == n and n for n in names)
    assert classes[0] == ("n01440764", "tench") and classes[-1] == ("n15075141", "toilet paper")
    assert dict(classes)["n02119789"] == "kit fox" and dict(classes)["n04592741"] == "airplane wing"
    # CLIP's list repeats exactly these two names; the wnid column disambiguates them.
    repeated = {n for n in names if names.count(n) > 1}
    assert repeated == {"missile", "sunglasses"}


def test_template_sets():
    clip80, asif7 = templates("clip80"), templates("asif7")
    assert len(clip80) == 80 == len(set(clip80))
    assert all(t.count("{}") == 1 for t in clip80)
    assert len(asif7) == 7 and set(asif7) <= set(clip80)
    assert asif7[0] == "itap of a {}." and clip80[0] == "a bad photo of a {}."
    assert templates("photo") == ["a photo of a {}."]
    with pytest.raises(ManifestError, match="unknown template set 'clip81'"):
        read_templates("clip81")


def test_media_cell_relative_inside_absolute_outside(tmp_path):
    inside = tmp_path / "data" / "a" / "x.jpg"
    assert media_cell(inside, tmp_path / "data") == "a/x.jpg"
    assert media_cell(inside, tmp_path / "manifests") == str(inside)


# ---- prompts ------------------------------------------------------------------------------------
def test_prompts_imagenet_asif7(tmp_path):
    result = build_prompts(tmp_path / "p.parquet", "imagenet", "asif7")
    m = read_manifest(result.path)
    assert m.rows == result.rows == 7000 and m.columns == ["id", "text", "label", "class_id"]
    # CLIP's two "missile" classes keep their own wnids (zero-shot keys classes by class_id)
    missile = {i for i, n in zip(m.column("class_id"), m.column("label"), strict=True)
               if n == "missile"}
    assert missile == {"n03773504", "n04008634"} and len(set(m.column("class_id"))) == 1000
    assert m.ids[:2] == ["c0000-t000", "c0000-t001"]
    assert m.column("text")[0] == "itap of a tench." and m.column("label")[6999] == "toilet paper"


def test_prompts_from_files_and_bad_template_line(tmp_path):
    classes = write(tmp_path / "classes.txt", "# my classes\ncat\n\ndog\n")
    good = write(tmp_path / "t.txt", "a photo of a {}.\na {} drawing\n")
    m = read_manifest(build_prompts(tmp_path / "p.parquet", classes, good).path)
    assert m.column("text") == ["a photo of a cat.", "a cat drawing", "a photo of a dog.",
                                "a dog drawing"]
    assert "class_id" not in m.columns                 # names from a file are the keys
    twice = write(tmp_path / "twice.txt", "cat\ndog\ncat\n")
    with pytest.raises(ManifestError, match=r"twice\.txt: line 3 repeats line 1 \('cat'\)"):
        build_prompts(tmp_path / "r.parquet", twice, good)
    bad = write(tmp_path / "bad.txt", "a photo of a {}.\na photo of a {c}.\n")
    with pytest.raises(ManifestError, match=r"bad\.txt: line\(s\) 2 must contain exactly one"):
        build_prompts(tmp_path / "q.parquet", classes, bad)


# ---- imagenet -----------------------------------------------------------------------------------
VAL_FILES = {  # file -> wnid; sorted-wnid indices 0, 1, 999
    "ILSVRC2012_val_00000293.JPEG": "n01440764",
    "ILSVRC2012_val_00000001.JPEG": "n01443537",
    "ILSVRC2012_val_00000002.JPEG": "n15075141",
}


def test_imagenet_class_folders(tmp_path):
    for name, wnid in VAL_FILES.items():
        jpg(tmp_path / "imagenet" / "val" / wnid / name)
    write(tmp_path / "imagenet" / "val" / "n01440764" / "notes.md", "ignored: not an image")
    result = build_imagenet(tmp_path / "imagenet", tmp_path / "imagenet" / "val.parquet")
    m = read_manifest(result.path)
    assert m.columns == ["id", "image", "label", "class_id", "split"]
    assert m.ids == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002",
                     "ILSVRC2012_val_00000293"]
    assert m.column("label") == ["goldfish", "toilet paper", "tench"]
    assert m.column("class_id") == ["n01443537", "n15075141", "n01440764"]
    assert set(m.column("split")) == {"test"}
    assert m.column("image")[0] == "val/n01443537/ILSVRC2012_val_00000001.JPEG"
    assert cells_resolve(m, "image")


def test_imagenet_flat_with_pair_labels_matches_folder_layout(tmp_path):
    flat = tmp_path / "flat"
    for name in VAL_FILES:
        jpg(flat / name)
    labels = {
        "tabs.txt": "".join(f"{n}\t{w}\n" for n, w in VAL_FILES.items()),
        # caffe val.txt style: 0-based sorted-wnid index, space separated
        "caffe.txt": "ILSVRC2012_val_00000293.JPEG 0\nILSVRC2012_val_00000001.JPEG 1\n"
                     "ILSVRC2012_val_00000002.JPEG 999\n",
        # Kaggle LOC_val_solution.csv: header, no extension, wnid first in the second field
        "kaggle.csv": "ImageId,PredictionString\n" + "".join(
            f"{n[:-5]},{w} 1 2 3 4\n" for n, w in VAL_FILES.items()),
    }
    for name, text in labels.items():
        out = tmp_path / "manifests" / f"{name}.parquet"
        m = read_manifest(build_imagenet(flat, out, labels=write(tmp_path / name, text)).path)
        assert m.ids == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002",
                         "ILSVRC2012_val_00000293"], name
        assert m.column("class_id") == ["n01443537", "n15075141", "n01440764"], name
        assert cells_resolve(m, "image")
        assert m.column("image")[0] == str(flat / "ILSVRC2012_val_00000001.JPEG")  # outside


def _devkit_order() -> list[str]:
    """A fake devkit class order (ILSVRC2012_ID k -> wnid), deliberately not sorted."""
    return imagenet_wnids()[::-1]


def test_imagenet_devkit_ground_truth_uses_devkit_order(tmp_path):
    flat = tmp_path / "flat"
    for i in (1, 2, 3):
        jpg(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    devkit = tmp_path / "devkit" / "data"
    write(devkit / "map_clsloc.txt", "".join(f"{w} {k} name_{k}\n"
                                             for k, w in enumerate(_devkit_order(), start=1)))
    truth = write(devkit / "ILSVRC2012_validation_ground_truth.txt", "1000\n1\n500\n")
    with pytest.raises(ManifestError, match="meta.mat.*--devkit-meta"):
        build_imagenet(flat, tmp_path / "m.parquet", labels=truth)
    m = read_manifest(build_imagenet(flat, tmp_path / "m.parquet", labels=truth,
                                     devkit_meta=devkit / "map_clsloc.txt").path)
    # ID 1000 -> first sorted wnid in this fake order, ID 1 -> last; a sorted-order reading of
    # the indices would give the opposite.
    assert m.column("class_id") == ["n01440764", "n15075141", imagenet_wnids()[500]]
    assert m.column("label")[:2] == ["tench", "toilet paper"]


def test_imagenet_devkit_meta_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    flat = tmp_path / "flat"
    jpg(flat / "ILSVRC2012_val_00000001.JPEG")
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    leaves = [(k, w, 0) for k, w in enumerate(_devkit_order(), start=1)]
    synsets = np.array(leaves + [(1001, "n00001740", 3)], dtype=dtype)  # a non-leaf ancestor
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": synsets})
    truth = write(tmp_path / "ILSVRC2012_validation_ground_truth.txt", "1\n")
    m = read_manifest(build_imagenet(flat, tmp_path / "m.parquet", labels=truth).path)
    assert m.column("class_id") == ["n15075141"]


def test_imagenet_errors(tmp_path):
    jpg(tmp_path / "val" / "cats" / "a.JPEG")
    with pytest.raises(ManifestError, match="no class subfolders"):
        build_imagenet(tmp_path / "val", tmp_path / "m.parquet")
    jpg(tmp_path / "val" / "n01440764" / "b.JPEG")
    with pytest.raises(ManifestError, match=r"folder\(s\) cats are not ImageNet-1k wnids"):
        build_imagenet(tmp_path / "val", tmp_path / "m.parquet")
    flat = tmp_path / "flat"
    jpg(flat / "ILSVRC2012_val_00000001.JPEG")
    labels = write(tmp_path / "l.txt", "ILSVRC2012_val_00000001.JPEG n01440764\n"
                                       "ILSVRC2012_val_00000002.JPEG n01440764\n"
                                       "ILSVRC2012_val_00000003.JPEG n01440764\n")
    with pytest.raises(ManifestError, match=r"2 media file\(s\) .*missing: .*00000002\.JPEG, .*"
                                            r"00000003\.JPEG"):
        build_imagenet(flat, tmp_path / "m.parquet", labels=labels)
    result = build_imagenet(flat, tmp_path / "m.parquet", labels=labels, check="skip")
    assert result.rows == 1 and result.skipped == {"rows with missing media": 2}
    assert build_imagenet(flat, tmp_path / "m.parquet", labels=labels, check="off").rows == 3
    bad = write(tmp_path / "bad.txt", "ILSVRC2012_val_00000001.JPEG n01440764\nx.JPEG 1000\n")
    with pytest.raises(ManifestError, match=r"bad\.txt: .*line 2"):
        build_imagenet(flat, tmp_path / "m.parquet", labels=bad)


# ---- COCO / Flickr30K (Karpathy) ----------------------------------------------------------------
def karpathy_entry(imgid: int, filename: str, split: str, captions: int = 5,
                   filepath: str | None = None) -> dict:
    entry = {"imgid": imgid, "filename": filename, "split": split, "sentids": [],
             "sentences": [{"raw": f"caption {k} of {filename} ", "tokens": ["caption"],
                            "imgid": imgid, "sentid": imgid * 10 + k} for k in range(captions)]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@pytest.fixture()
def coco(tmp_path) -> Path:
    """coco/ with val2014 + train2014 images and Karpathy's dataset_coco.json."""
    root = tmp_path / "coco"
    images = [("val2014", "COCO_val2014_000000000042.jpg", "test"),
              ("train2014", "COCO_train2014_000000000009.jpg", "train"),
              ("val2014", "COCO_val2014_000000000007.jpg", "restval")]
    entries = []
    for i, (folder, name, split) in enumerate(images):
        jpg(root / folder / name)
        entries.append(karpathy_entry(i, name, split, captions=6 if i == 1 else 5,
                                      filepath=folder))
    write(root / "dataset_coco.json", json.dumps({"images": entries, "dataset": "coco"}))
    return root


def test_coco_karpathy(coco):
    result = build_karpathy(coco / "dataset_coco.json", coco / "coco.parquet", "coco")
    m = read_manifest(result.path)
    assert m.rows == 15 and m.columns == ["id", "image", "text", "split"]
    assert m.ids[:6] == [f"COCO_val2014_000000000042.jpg#{k}" for k in range(5)] + \
        ["COCO_train2014_000000000009.jpg#0"]
    assert m.column("split") == ["test"] * 5 + ["train"] * 10  # restval -> train
    assert len(set(m.column("image")[:5])) == 1
    assert m.column("image")[0] == "val2014/COCO_val2014_000000000042.jpg"
    assert m.column("text")[0] == "caption 0 of COCO_val2014_000000000042.jpg"
    assert result.splits == {"test": 5, "train": 10}
    # relative cells: the dataset folder can move with its manifest
    moved = coco.parent / "moved"
    shutil.move(coco, moved)
    assert cells_resolve(read_manifest(moved / "coco.parquet"), "image")


def test_flickr30k_karpathy(tmp_path):
    entries = [karpathy_entry(0, "1000092795.jpg", "train"), karpathy_entry(1, "10002456.jpg",
                                                                            "val")]
    for e in entries:
        jpg(tmp_path / "flickr30k-images" / e["filename"])
    source = write(tmp_path / "dataset_flickr30k.json", json.dumps({"images": entries,
                                                                    "dataset": "flickr30k"}))
    m = read_manifest(build_karpathy(source, tmp_path / "out" / "f.parquet", "flickr30k",
                                     images=tmp_path / "flickr30k-images").path)
    assert m.rows == 10 and m.ids[5] == "10002456.jpg#0"
    assert m.column("split") == ["train"] * 5 + ["val"] * 5
    assert m.column("image")[0] == str(tmp_path / "flickr30k-images" / "1000092795.jpg")
    assert cells_resolve(m, "image")
    with pytest.raises(ManifestError, match="'flickr30k' split, not 'coco'.*manifest flickr30k"):
        build_karpathy(source, tmp_path / "c.parquet", "coco")


def test_karpathy_errors(coco, tmp_path):
    broken = write(tmp_path / "broken.json", '{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(ManifestError, match=r"broken\.json:2:\d+: not valid JSON"):
        build_karpathy(broken, tmp_path / "m.parquet", "coco")
    data = json.loads((coco / "dataset_coco.json").read_text())
    del data["images"][1]["sentences"]
    data["images"][2]["sentences"] = data["images"][2]["sentences"][:3]
    source = write(tmp_path / "d.json", json.dumps(data))
    with pytest.raises(ManifestError, match=r"2 malformed image entries: images\[1\] "
                                            r"\(COCO_train2014_000000000009\.jpg\) has no "
                                            r"'sentences'; images\[2\] .* has 3 non-empty"):
        build_karpathy(source, tmp_path / "m.parquet", "coco", images=coco)
    (coco / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(ManifestError, match=r"1 media file\(s\) listed for 5 of 15 rows are "
                                            r"missing: val2014/COCO_val2014_000000000042\.jpg"):
        build_karpathy(coco / "dataset_coco.json", coco / "m.parquet", "coco")


# ---- CC3M: TSV and img2dataset folder -----------------------------------------------------------
def test_cc3m_tsv(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        jpg(tmp_path / "cc3m" / "images" / name)
    tsv = write(tmp_path / "cc3m" / "train.tsv",
                "title\tfilepath\tstatus\n"
                "a dog on a beach\timages/a.jpg\tsuccess\n"
                "a \"quoted\" cat\timages/b.jpg\tsuccess\n"
                "gone\t\tfailed_to_download\n"
                "a tree\timages/c.jpg\tsuccess\n")
    result = build_cc3m(tsv, tmp_path / "cc3m" / "cc3m.parquet")
    m = read_manifest(result.path)
    assert m.ids == ["000000000", "000000001", "000000003"]
    assert m.column("text") == ["a dog on a beach", 'a "quoted" cat', "a tree"]
    assert m.column("image") == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert set(m.column("split")) == {"train"} and cells_resolve(m, "image")
    assert result.skipped == {"failed downloads": 1}
    with pytest.raises(ManifestError, match="no caption column 'caption_en' .*columns: title, "
                                            "filepath, status"):
        build_cc3m(tsv, tmp_path / "m.parquet", caption_column="caption_en")


def test_cc3m_tsv_incomplete_rows(tmp_path):
    jpg(tmp_path / "x.jpg")
    csv_file = write(tmp_path / "pairs.csv", "key,caption,image\nk1,hello,x.jpg\nk2,,x.jpg\n")
    with pytest.raises(ManifestError, match=r"empty caption or path: 1 found: line 3"):
        build_cc3m(csv_file, tmp_path / "m.parquet", id_column="key")
    m = read_manifest(build_cc3m(csv_file, tmp_path / "m.parquet", id_column="key",
                                 skip_incomplete=True).path)
    assert m.ids == ["k1"]
    unknown = write(tmp_path / "u.tsv", "caption\turl\nhi\thttp://x\n")
    with pytest.raises(ManifestError, match=r"which column holds the path .*--path-column"):
        build_cc3m(unknown, tmp_path / "m.parquet")


def test_cc3m_img2dataset_folder(tmp_path):
    root = tmp_path / "cc3m"
    jpg(root / "00000" / "000000001.jpg")
    write(root / "00000" / "000000001.txt", "second caption\n")
    jpg(root / "00000" / "000000000.jpg")
    write(root / "00000" / "000000000.json", json.dumps({"caption": "from json", "key": "0"}))
    jpg(root / "00001" / "000010000.jpg")  # caption only in the shard's parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["000010000"], "caption": ["from parquet"],
                             "status": ["success"]}), root / "00001.parquet")
    m = read_manifest(build_cc3m(root, root / "cc3m.parquet").path)
    assert m.ids == ["000000000", "000000001", "000010000"]
    assert m.column("text") == ["from json", "second caption", "from parquet"]
    assert m.column("image")[2] == "00001/000010000.jpg" and cells_resolve(m, "image")
    jpg(root / "00001" / "000010001.jpg")
    with pytest.raises(ManifestError, match=r"no caption .*: 1 found: 00001/000010001\.jpg"):
        build_cc3m(root, root / "cc3m.parquet")
    with pytest.raises(ManifestError, match="no numbered shard folders"):
        build_cc3m(root / "00000", tmp_path / "m.parquet")


# ---- webdataset ---------------------------------------------------------------------------------
@pytest.fixture()
def shards(tmp_path) -> Path:
    folder = tmp_path / "wds"
    image = jpeg_bytes()
    make_tar(folder / "00000.tar", [
        ("000000000.jpg", image), ("000000000.txt", b"first"), ("000000000.json", b"{}"),
        ("000000001.jpg", image), ("000000001.txt", "caf\u00e9 au lait".encode()),
    ])
    make_tar(folder / "00001.tar", [("000010000.txt", b"third"), ("000010000.jpg", image)])
    return folder


def test_expand_braces():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}{0..1}") == ["a0", "a1", "b0", "b1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_streams_each_tar_once(shards, tmp_path, monkeypatch):
    opened = []
    real_open = tarfile.open

    def spy(name, mode="r", *args, **kwargs):
        opened.append((Path(name).name, mode))
        return real_open(name, mode, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", spy)
    out = tmp_path / "wds.parquet"
    m = read_manifest(build_webdataset(f"{shards}/{{00000..00001}}.tar", out).path)
    assert opened == [("00000.tar", "r|"), ("00001.tar", "r|")]
    assert m.ids == ["000000000", "000000001", "000010000"]
    assert m.column("image") == ["wds/00000.tar::000000000.jpg", "wds/00000.tar::000000001.jpg",
                                 "wds/00001.tar::000010000.jpg"]
    assert m.column("text") == ["first", "caf\u00e9 au lait", "third"]
    assert cells_resolve(m, "image")
    archive, member = m.column("image")[2].split("::")
    with real_open(m.resolve(archive)) as tar:
        Image.open(tar.extractfile(member)).verify()
    same = read_manifest(build_webdataset(shards, tmp_path / "folder.parquet").path)
    assert same.table.equals(m.table)


def test_webdataset_errors(shards, tmp_path):
    with pytest.raises(ManifestError, match=r"1 of 3 shard\(s\) missing: .*00002\.tar"):
        build_webdataset(f"{shards}/{{00000..00002}}.tar", tmp_path / "m.parquet")
    result = build_webdataset(f"{shards}/{{00000..00002}}.tar", tmp_path / "m.parquet",
                              check="skip")
    assert result.rows == 3 and result.skipped == {"missing shards": 1}
    make_tar(shards / "00002.tar", [("000020000.jpg", jpeg_bytes())])
    with pytest.raises(ManifestError, match=r"without an image or a \.txt caption: 1 found: "
                                            r"00002\.tar:000020000"):
        build_webdataset(shards, tmp_path / "m.parquet")
    assert build_webdataset(shards, tmp_path / "m.parquet", skip_incomplete=True).rows == 3
    write(shards / "00003.tar", "this is not a tar archive" * 40)
    with pytest.raises(ManifestError, match=r"00003\.tar: unreadable tar shard"):
        build_webdataset(shards, tmp_path / "m.parquet", skip_incomplete=True)
    (shards / "00003.tar").unlink()
    with tarfile.open(shards / "00004.tar", "w:gz") as tar:
        tar.add(shards / "00000.tar", arcname="000040000.txt")
    with pytest.raises(ManifestError, match=r"00004\.tar: compressed tar"):
        build_webdataset(shards, tmp_path / "m.parquet", skip_incomplete=True)


# ---- AudioCaps / Clotho -------------------------------------------------------------------------
AUDIOCAPS_HEADER = "audiocap_id,youtube_id,start_time,caption\n"


def test_audiocaps(tmp_path):
    data = tmp_path / "audiocaps"
    write(data / "train.csv", AUDIOCAPS_HEADER + '91139,r1nicOVtvkQ,130,"A woman talks, then '
                                                 'a dog barks"\n')
    write(data / "val.csv", AUDIOCAPS_HEADER + "97151,vfY_TJq7n_U,130,Rustling occurs\n"
                                               "97152,vfY_TJq7n_U,130,Leaves rustle\n")
    write(data / "test.csv", AUDIOCAPS_HEADER + "103549,zj2R0XoFr5k,30,An engine idles\n")
    wav(data / "audio" / "train" / "r1nicOVtvkQ.wav")  # by youtube_id
    wav(data / "audio" / "val" / "YvfY_TJq7n_U.flac")  # AudioSet-style Y prefix
    wav(data / "audio" / "test" / "103549.wav")  # by audiocap_id
    result = build_audiocaps(data, data / "audiocaps.parquet", audio=data / "audio")
    m = read_manifest(result.path)
    assert m.columns == ["id", "audio", "text", "split"]
    assert m.ids == ["91139", "97151", "97152", "103549"]
    assert m.column("split") == ["train", "val", "val", "test"]
    assert m.column("text")[0] == "A woman talks, then a dog barks"
    assert m.column("audio") == ["audio/train/r1nicOVtvkQ.wav", "audio/val/YvfY_TJq7n_U.flac",
                                 "audio/val/YvfY_TJq7n_U.flac", "audio/test/103549.wav"]
    assert cells_resolve(m, "audio")
    (data / "audio" / "test" / "103549.wav").unlink()
    with pytest.raises(ManifestError, match=r"1 media file\(s\) .*missing: audio/zj2R0XoFr5k.wav"):
        build_audiocaps(data, data / "audiocaps.parquet", audio=data / "audio")
    write(data / "test.csv", "audiocap_id,youtube_id,caption\n1,x,y\n")
    with pytest.raises(ManifestError, match=r"test\.csv: missing column\(s\) start_time"):
        build_audiocaps(data, data / "audiocaps.parquet", audio=data / "audio")


CLOTHO_HEADER = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"


def test_clotho(tmp_path):
    data = tmp_path / "clotho"
    write(data / "clotho_captions_development.csv",
          CLOTHO_HEADER + '"Distorted AM Radio noise.wav",a,b,c,d,"e, with a comma"\n')
    write(data / "clotho_captions_evaluation.csv", CLOTHO_HEADER + "birds.wav,1,2,3,4,5\n")
    wav(data / "development" / "Distorted AM Radio noise.wav")
    wav(data / "evaluation" / "birds.wav")
    m = read_manifest(build_clotho(data, data / "clotho.parquet").path)
    assert m.rows == 10
    assert m.ids[0] == "Distorted AM Radio noise.wav#0" and m.ids[9] == "birds.wav#4"
    assert m.column("split") == ["train"] * 5 + ["test"] * 5
    assert m.column("text")[4] == "e, with a comma"
    assert set(m.column("audio")[:5]) == {"development/Distorted AM Radio noise.wav"}
    assert cells_resolve(m, "audio")
    write(data / "clotho_captions_evaluation.csv", CLOTHO_HEADER + "birds.wav,1,2,,4,5\n")
    with pytest.raises(ManifestError, match=r"evaluation\.csv: empty cells at line 2 "
                                            r"\(caption_3\)"):
        build_clotho(data, data / "clotho.parquet")


# ---- folder -------------------------------------------------------------------------------------
def test_folder(tmp_path):
    root = tmp_path / "media"
    jpg(root / "cats" / "x.jpg")
    write(root / "cats" / "x.txt", "a cat\n")
    jpg(root / "cats" / "y.png")
    wav(root / "cats" / "y.wav")
    write(root / "cats" / "y.txt", "a cat that meows")
    wav(root / "dogs" / "z.flac")
    write(root / "dogs" / "z.txt", "a dog barking")
    write(root / "notes.md", "not media")
    m = read_manifest(build_folder(root, root / "m.parquet", label_from_folder=True,
                                   split="val").path)
    assert m.columns == ["id", "image", "audio", "text", "label", "split"]
    assert m.ids == ["cats/x", "cats/y", "dogs/z"]
    assert m.column("image") == ["cats/x.jpg", "cats/y.png", None]
    assert m.column("audio") == [None, "cats/y.wav", "dogs/z.flac"]
    assert m.column("text") == ["a cat", "a cat that meows", "a dog barking"]
    assert m.column("label") == ["cats", "cats", "dogs"]
    jpg(root / "dogs" / "w.jpg")
    with pytest.raises(ManifestError, match=r"1 media file\(s\) have no .*caption: dogs/w"):
        build_folder(root, root / "m.parquet")
    assert build_folder(root, root / "m.parquet", skip_incomplete=True).rows == 3
    jpg(root / "cats" / "x.jpeg")
    with pytest.raises(ManifestError, match=r"share a stem.*x\.jpeg and x\.jpg"):
        build_folder(root, root / "m.parquet", skip_incomplete=True)


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_coco_check_files(coco):
    source, out = str(coco / "dataset_coco.json"), str(coco / "coco.parquet")
    result = runner.invoke(app, ["manifest", "coco", source, out])
    assert result.exit_code == 0, result.output
    assert "(15 rows: test 5, train 10)" in result.output
    (coco / "train2014" / "COCO_train2014_000000000009.jpg").unlink()
    result = runner.invoke(app, ["manifest", "coco", source, out])
    assert result.exit_code == 2
    assert "COCO_train2014_000000000009.jpg" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["manifest", "coco", source, out, "--skip-missing"])
    assert result.exit_code == 0 and "left out 5 rows with missing media" in result.output
    result = runner.invoke(app, ["manifest", "coco", source, out, "--no-check-files"])
    assert result.exit_code == 0 and read_manifest(out).rows == 15


def test_cli_other_builders(shards, tmp_path):
    result = runner.invoke(app, ["manifest", "prompts", str(tmp_path / "p.parquet"),
                                 "--templates", "photo"])
    assert result.exit_code == 0 and read_manifest(tmp_path / "p.parquet").rows == 1000
    result = runner.invoke(app, ["manifest", "webdataset", f"{shards}/{{00000..00001}}.tar",
                                 str(tmp_path / "w.parquet"), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert set(read_manifest(tmp_path / "w.parquet").column("split")) == {"val"}
    for name, wnid in VAL_FILES.items():
        jpg(tmp_path / "val" / wnid / name)
    result = runner.invoke(app, ["manifest", "imagenet", str(tmp_path / "val"),
                                 str(tmp_path / "i.parquet")])
    assert result.exit_code == 0 and read_manifest(tmp_path / "i.parquet").rows == 3
    result = runner.invoke(app, ["manifest", "cc3m", str(tmp_path / "nope.tsv"),
                                 str(tmp_path / "c.parquet")])
    assert result.exit_code == 2 and "nope.tsv: caption table not found" in result.output
