"""`worker.video.encode_mp4` on Bora's output shape (40 frames of 256×256 at 8 fps, a 5 s clip) side by side with
writing the same frames raw. The figures: encode time as a fraction of the clip's duration (real-time factor),
the encode / raw-write ratio, and what H.264 at our CRF makes of the size.

    .venv/bin/python bench/mp4_encode.py [--runs 5]

Content: `smooth` (moving colour gradients and drifting Gaussian blobs: the broad structure of a generated
clip), `textured` (the same plus a fine drifting grain, closer to what a VAE decoder outputs) and `noise`
(uniform random pixels, the worst case for H.264). Baselines: the same frames
piped through the same ffmpeg as `rawvideo` in a NUT file (process start + pipe, no compression) and
`np.save` (a plain disk write). Also the JPEG poster frame (`write_thumbnail`, the middle frame, as a job
writes it). Each figure is the median of `--runs` runs, the kinds interleaved per run; files go to a temp dir.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from worker.video import CRF, SYNTHETIC_LABEL, encode_mp4, probe_mp4, write_thumbnail

FRAMES, SIZE, FPS = 40, 256, 8
METADATA = {"title": "Bora synthetic video bench", "comment": SYNTHETIC_LABEL,
            "description": "A cross-section of a beating human heart, ultrasound style"}


def smooth_frames(seed: int = 0) -> np.ndarray:
    """[T,H,W,3] uint8: three drifting colour gradients plus a few Gaussian blobs moving on smooth paths."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAMES, dtype=np.float32)[:, None, None]
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    channels = []
    for c in range(3):
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.06)
        channels.append(0.5 + 0.35 * np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y + speed * t) + c))
    video = np.stack(channels, axis=-1)  # [T,H,W,3] in ~[0.15, 0.85]
    for _ in range(5):
        cx, cy, vx, vy = rng.uniform(0.2, 0.8, 2).tolist() + rng.uniform(-0.01, 0.01, 2).tolist()
        radius, colour = rng.uniform(0.05, 0.15), rng.uniform(-0.4, 0.4, 3).astype(np.float32)
        px, py = cx + vx * t, cy + vy * t  # [T,1,1]
        blob = np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * radius**2))  # [T,H,W]
        video += blob[..., None] * colour
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)


def textured_frames(seed: int = 0) -> np.ndarray:
    """`smooth` plus a fine grain texture (±12 levels) that drifts a pixel per frame, like decoder detail."""
    grain = np.random.default_rng(seed + 1).normal(0, 6, (SIZE, SIZE + FRAMES, 3)).clip(-12, 12)
    video = smooth_frames(seed).astype(np.float32)
    for i in range(FRAMES):
        video[i] += grain[:, i:i + SIZE]
    return video.clip(0, 255).round().astype(np.uint8)


def noise_frames(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)


def write_raw_ffmpeg(frames: np.ndarray, path: Path) -> None:
    writer = imageio_ffmpeg.write_frames(
        str(path), (SIZE, SIZE), fps=FPS, codec="rawvideo", pix_fmt_in="rgb24", pix_fmt_out="rgb24",
        quality=None, macro_block_size=1,
    )
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    contents = {"smooth": smooth_frames(), "textured": textured_frames(), "noise": noise_frames()}
    duration_s = FRAMES / FPS
    with tempfile.TemporaryDirectory(prefix="bora-bench-mp4-") as tmp_name:
        tmp = Path(tmp_name)
        writers: dict[str, tuple[str, Callable[[np.ndarray, Path], None]]] = {
            "mp4 (encode_mp4)": ("mp4", lambda f, p: encode_mp4(f, FPS, p, METADATA)),
            "raw via ffmpeg": ("nut", write_raw_ffmpeg),
            "np.save": ("npy", lambda f, p: np.save(p, f)),
            "thumbnail jpg": ("jpg", lambda f, p: write_thumbnail(f[len(f) // 2], p)),
        }
        times: dict[tuple[str, str], list[float]] = {}
        sizes: dict[tuple[str, str], int] = {}
        for frames in contents.values():  # warm-up: page cache, imports, the ffmpeg binary
            for ext, write in writers.values():
                write(frames, tmp / f"warm.{ext}")
        for _ in range(args.runs):
            for name, frames in contents.items():
                for label, (ext, write) in writers.items():
                    path = tmp / f"{name}.{ext}"
                    path.unlink(missing_ok=True)
                    times.setdefault((name, label), []).append(timed(lambda: write(frames, path)))  # noqa: B023
                    sizes[name, label] = path.stat().st_size
        for name in contents:
            probe = probe_mp4(tmp / f"{name}.mp4")
            assert probe["frames"] == FRAMES and (probe["width"], probe["height"]) == (SIZE, SIZE), probe

    print(f"{FRAMES}×{SIZE}×{SIZE} RGB at {FPS} fps ({duration_s:g} s clip), median of {args.runs} runs, "
          f"libx264 CRF {CRF} yuv420p +faststart, {os.cpu_count()} CPUs")
    print(f"{'content':<9} {'writer':<17} {'ms':>8} {'× realtime':>10} {'MB':>8} {'Mbit/s':>8}")
    median = {key: statistics.median(values) for key, values in times.items()}
    for name in contents:
        for label in writers:
            seconds, size = median[name, label], sizes[name, label]
            rate = "" if label == "thumbnail jpg" else f"{size * 8 / duration_s / 1e6:8.2f}"
            print(f"{name:<9} {label:<17} {seconds * 1e3:8.1f} {seconds / duration_s:10.3f} {size / 1e6:8.3f} "
                  f"{rate:>8}".rstrip())
    for name in contents:
        mp4, raw, npy = (median[name, label] for label in ("mp4 (encode_mp4)", "raw via ffmpeg", "np.save"))
        print(f"{name}: encode / raw-ffmpeg = {mp4 / raw:.2f}, encode / np.save = {mp4 / npy:.1f}, "
              f"encode = {mp4 / duration_s:.3f} of the clip's duration, mp4 is "
              f"{sizes[name, 'mp4 (encode_mp4)'] / sizes[name, 'np.save']:.3f} of the raw size; "
              f"thumbnail {median[name, 'thumbnail jpg'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
