"""Shared fixtures: the checked-in toy dataset and a scratch cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "data_manifests" / "toy"


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """A private copy of the checked-in toy dataset (tests may damage their copy)."""
    target = tmp_path_factory.mktemp("toy") / "toy"
    shutil.copytree(TOY, target)
    return target


@pytest.fixture()
def toy_copy(tmp_path) -> Path:
    """A per-test copy of the toy dataset, for tests that corrupt files."""
    target = tmp_path / "toy"
    shutil.copytree(TOY, target)
    return target
