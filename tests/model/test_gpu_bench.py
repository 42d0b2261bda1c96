"""bench/gpu.sh has not run on a GPU here: its dry run executes every stage end to end on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

STAGES = ("reference", "sdpa", "xl", "batch", "compile", "t5", "samplers")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_script_dry_run_prints_a_row_for_every_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "LIMIT_SCALE": "10"}
    result = subprocess.run(["bash", "bench/gpu.sh", "--tiny", "--device", "cpu"], cwd=REPO_ROOT, text=True,
                            capture_output=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row.split(" | ")[0].strip("| ") for row in rows} == set(STAGES), result.stdout
    assert not [row for row in rows if "FAILED" in row], result.stdout
