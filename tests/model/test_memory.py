"""Memory plan: exact weight counts, the placement `bora doctor` advises, and estimates vs CPU measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.memory import plan, stdit_parameters, vae_decode_memory
from model.presets import BORA_STDIT

pytestmark = pytest.mark.slow  # minutes on 2 cores: `make test-slow`, its own CI stage

GIB = 2**30


def test_stdit_xl2_weights_are_counted_exactly(reference_dir):
    listing = json.loads((reference_dir / "stdit_xl2_keys.json").read_text())
    assert stdit_parameters(BORA_STDIT) == 759_620_768 + 832_512  # parameters + buffers, reference README
    assert listing  # the same file the README numbers come from


@pytest.mark.parametrize("memory_gib, t5_on_device, fits", [(80, True, True), (16, False, True), (2, False, False)])
def test_plan_places_t5_and_says_whether_bora_fits(memory_gib, t5_on_device, fits):
    result = plan(memory_gib * GIB, BORA_STDIT, 40, 256, 256)
    assert (result.text_encoder_on_device, result.fits) == (t5_on_device, fits)
    if not t5_on_device:
        assert any("BORA_TEXT_ENCODER_DEVICE=cpu" in line for line in result.advice)


def test_vae_decode_memory_grows_with_frames_per_call():
    one, four = (vae_decode_memory(torch.float16, 256, 256, n).activations for n in (1, 4))
    assert four == 4 * one


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "doctor", *args], capture_output=True, text=True,
                          timeout=300)


def test_doctor_says_how_a_16_gib_gpu_serves_bora():
    result = run_cli("--gpu-memory", "16")
    assert result.returncode == 0, result.stderr
    assert "text_encoder  cpu" in result.stdout and "fits" in result.stdout
    assert "BORA_TEXT_ENCODER_DEVICE=cpu" in result.stdout


def test_doctor_refuses_a_shape_that_does_not_fit():
    result = run_cli("--gpu-memory", "2", "--frames", "128", "--height", "512", "--width", "512")
    assert result.returncode == 1
    assert "does NOT fit" in result.stdout


@pytest.mark.timeout(900)
def test_estimates_agree_with_cpu_measurements_at_small_scale():
    """bench/memory_plan.py measures each stage's peak (RSS high-water mark) at small shapes."""
    result = subprocess.run([sys.executable, "bench/memory_plan.py", "--json"], capture_output=True, text=True,
                            timeout=900, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    rows = {row["stage"]: row for row in map(json.loads, result.stdout.splitlines())}
    for stage in ("transformer", "vae_decode"):
        ratio = rows[stage]["measured"] / rows[stage]["estimate"]
        assert 0.5 < ratio < 2.0, (stage, rows[stage])
