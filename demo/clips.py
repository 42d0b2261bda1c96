"""Procedural clip sets: drawn in memory (for the VAE and the eval's real clips) or written as a training set
of MP4s plus an upstream-format CSV, so the demo model is trained through the path a user's data takes."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from demo.captions import caption, pick_template
from demo.procedural import DOMAINS, FPS, NUM_FRAMES, SIZE, render, sample_attributes


@dataclass
class Clip:
    domain: str
    attrs: dict
    caption: str
    frames: np.ndarray  # uint8 [T, H, W, 3]


def make_clips(per_domain: int, seed: int, held_out: bool = False, frames: int = NUM_FRAMES,
               size: int = SIZE) -> list[Clip]:
    """`per_domain` clips of each domain, interleaved (cell, ultrasound, mri, endoscopy, cell, ...);
    captions from the training templates, or the held-out one."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(per_domain):
        for domain in DOMAINS:
            attrs = sample_attributes(domain, rng)
            text = caption(domain, attrs, pick_template(rng, held_out))
            clips.append(Clip(domain, attrs, text, render(domain, attrs, rng, frames, size)))
    return clips


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """H.264 at a low CRF: training data should lose little to compression."""
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_in="rgb24", pix_fmt_out="yuv444p", quality=None,
                                         output_params=["-crf", "10", "-preset", "veryfast"],
                                         macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_training_set(out: str | Path, per_domain: int, seed: int) -> tuple[Path, list[Clip]]:
    """Write `clips/<domain>-<n>.mp4` and `train.csv` (path relative to `out`, caption) under `out`."""
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    clips = make_clips(per_domain, seed)
    csv_path = out / "train.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        for number, clip in enumerate(clips):
            relative = Path("clips") / f"{clip.domain}-{number:05d}.mp4"
            write_mp4(clip.frames, out / relative)
            writer.writerow([relative.as_posix(), clip.caption])
    return csv_path, clips
