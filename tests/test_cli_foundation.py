"""The CLI surface of the foundation: help, manifest toy, import, info, error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from alignpipe.app.cli import app
from alignpipe.app.toy import folder_digest

runner = CliRunner()


def test_help_lists_every_verb():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("embed", "fit", "eval", "similarity", "info", "import", "run", "manifest"):
        assert f" {verb} " in result.output


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "alignpipe", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "import" in result.stdout


def test_manifest_toy_command(tmp_path):
    args = ["manifest", "toy", str(tmp_path / "t"), "--rows", "30", "--seed", "7"]
    assert runner.invoke(app, args).exit_code == 0
    first = folder_digest(tmp_path / "t")
    assert runner.invoke(app, args).exit_code == 0
    assert folder_digest(tmp_path / "t") == first
    assert (tmp_path / "t" / "prompts.parquet").exists()


def test_import_then_info(tmp_path, toy_dir):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((600, 24), np.float32))
    result = runner.invoke(app, [
        "import", str(tmp_path / "x.npy"), "--manifest", str(toy_dir / "toy.parquet"),
        "--modality", "audio", "--encoder", "outside-audio", "--cache", str(tmp_path / "c"),
        "--unit-rows", "200"])
    assert result.exit_code == 0, result.output
    store = tmp_path / "c" / "toy" / "outside-audio"
    result = runner.invoke(app, ["info", str(store), "--json"])
    assert result.exit_code == 0, result.output
    details = json.loads(result.output)
    assert (details["rows"], details["dim"], details["dtype"]) == (600, 24, "float16")
    assert details["valid"] == 600 and details["modality"] == "audio"
    assert (details["units_done"], details["units_total"]) == (3, 3)
    assert details["encoder"]["name"] == "outside-audio" and details["size_bytes"] > 0
    table = runner.invoke(app, ["info", str(store)])
    assert table.exit_code == 0 and "3 / 3" in table.output and "sha256" in table.output


def test_user_mistakes_get_a_message_not_a_traceback(tmp_path, toy_dir):
    result = runner.invoke(app, ["info", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "no such store" in result.output and "Traceback" not in result.output
    np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float32))
    result = runner.invoke(app, [
        "import", str(tmp_path / "x.npy"), "--manifest", str(toy_dir / "toy.parquet"),
        "--modality", "image", "--encoder", "e", "--cache", str(tmp_path / "c")])
    assert result.exit_code == 2 and "has 10 rows but manifest" in result.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*"))
