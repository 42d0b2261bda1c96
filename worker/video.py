"""MP4 (H.264 yuv420p, +faststart) and JPEG poster frames with the ffmpeg that imageio-ffmpeg ships.

There is no ffprobe next to that ffmpeg, so `probe_mp4` reads streams with `imageio_ffmpeg.read_frames`,
counts frames by decoding, and takes the container tags from the header ffmpeg prints for `-i`.
"""

from __future__ import annotations

import re
import struct
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np

SYNTHETIC_LABEL = "synthetic — AI-generated"

# libx264 constant-rate factor: 18 is visually near-lossless for these small clips and keeps them small.
CRF = 18
_FFMPEG_TIMEOUT_S = 120.0


def _check_frames(frames: np.ndarray) -> tuple[int, int, int]:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a [T,H,W,3] array, got {getattr(frames, 'shape', type(frames))}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("frames is empty")
    # yuv420p subsamples chroma 2×2; we never let ffmpeg rescale silently (macro_block_size=1 below).
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {w}x{h}")
    return t, h, w


def _printable(value: str) -> str:
    """A tag value with control characters (NUL, newlines, escapes) as spaces: they never reach ffmpeg's argv."""
    return "".join(" " if unicodedata.category(char) == "Cc" else char for char in value)


def encode_mp4(frames: np.ndarray, fps: int, path: Path, metadata: dict[str, str]) -> None:
    """Write `frames` [T,H,W,3] uint8 to `path` as H.264 yuv420p with the moov atom first.

    `metadata` becomes container tags (e.g. `comment`, `title`); keys must be plain identifiers.
    """
    _, h, w = _check_frames(frames)
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    params = ["-crf", str(CRF), "-movflags", "+faststart"]
    for key, value in metadata.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"metadata key {key!r} is not a plain identifier")
        params += ["-metadata", f"{key}={_printable(value)}"]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        quality=None,  # rate control is the -crf above
        macro_block_size=1,  # sizes are checked above; never resize
        ffmpeg_timeout=_FFMPEG_TIMEOUT_S,
        output_params=params,
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def write_thumbnail(frame: np.ndarray, path: Path, quality: int = 90) -> None:
    """Write one [H,W,3] uint8 frame as a JPEG poster image."""
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"thumbnail frame must be [H,W,3] uint8, got {frame.shape} {frame.dtype}")
    iio.imwrite(path, frame, extension=".jpg", quality=quality)


def _container_tags(path: Path) -> dict[str, str]:
    """Container-level metadata from the header `ffmpeg -i` prints (the first `Metadata:` block)."""
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
        capture_output=True,
        timeout=_FFMPEG_TIMEOUT_S,
    )
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    tags: dict[str, str] = {}
    inside = False
    for line in lines:
        if line.strip() == "Metadata:" and not inside and not tags:
            inside = True
            continue
        if inside:
            match = re.match(r"^\s{4}(\S[^:]*?)\s*: (.*)$", line)
            if not match:
                break
            tags[match.group(1)] = match.group(2)
    return tags


def top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types in file order (e.g. ftyp, moov, mdat for a faststart file)."""
    boxes = []
    with open(path, "rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                break
            size, kind = struct.unpack(">I4s", header)
            boxes.append(kind.decode("latin-1"))
            if size == 1:  # 64-bit size follows the type
                size = struct.unpack(">Q", f.read(8))[0]
                f.seek(size - 16, 1)
            elif size == 0:  # box runs to the end of the file
                break
            else:
                f.seek(size - 8, 1)
    return boxes


def probe_mp4(path: Path) -> dict[str, Any]:
    """Decode `path` and return {frames, width, height, fps, duration_s, codec, pix_fmt, tags, faststart}."""
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(gen)
    finally:
        gen.close()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    fps = float(meta["fps"])
    boxes = top_level_boxes(path)
    return {
        "frames": int(frames),
        "width": int(width),
        "height": int(height),
        "fps": fps,
        "duration_s": frames / fps if fps else float(meta.get("duration") or 0.0),
        "codec": meta["codec"],
        "pix_fmt": str(meta["pix_fmt"]).split("(")[0],
        "tags": _container_tags(path),
        "faststart": "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"),
    }


def read_mp4(path: Path) -> np.ndarray:
    """Decode every frame of `path` to a [T,H,W,3] uint8 array (tests and tooling)."""
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in gen]
    return np.stack(frames)
