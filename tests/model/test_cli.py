"""`bora generate` with the tiny preset writes an MP4 whose frames, size and fps read back as requested."""

from __future__ import annotations

import subprocess
import sys

import imageio_ffmpeg


def test_generate_writes_the_requested_video(tiny_model_dir, tmp_path):
    out = tmp_path / "video.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "generate", "an endoscopy of the colon", "--out", str(out),
         "--model", str(tiny_model_dir), "--steps", "2", "--seed", "5", "--frames", "8", "--height", "48",
         "--width", "64", "--fps", "12", "--sampler", "ddim", "--device", "cpu"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "seed 5" in result.stdout
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (64, 48) and meta["fps"] == 12
    assert len(frames) == 8


def test_generate_rejects_a_bad_size_with_a_clear_message(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "generate", "x", "--out", str(tmp_path / "v.mp4"),
         "--model", str(tiny_model_dir), "--height", "50", "--device", "cpu"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode != 0
    assert "height=50" in result.stderr
