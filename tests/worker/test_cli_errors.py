"""A failing `bora` command prints one line and exits 1; `bora --debug` shows the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _bora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["inspect", "{missing}"], "no such checkpoint file or folder"),
        (["inspect", "{folder}"], "cannot tell which weights to load"),
        (["assemble", "--checkpoint", "{missing}", "--vae", "{missing}", "--t5", "{missing}", "--out", "{folder}/o"],
         "does not exist"),
    ],
)
def test_errors_are_one_line(tmp_path, args, says):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not weights")
    paths = {"missing": str(tmp_path / "missing"), "folder": str(tmp_path / "folder")}
    result = _bora(*(arg.format(**paths) for arg in args))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and says in result.stderr
    assert "Traceback" not in result.stderr and "--debug" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = _bora("--debug", "inspect", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr
