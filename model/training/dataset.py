"""Text–video pairs in upstream's CSV format, read and transformed as Open-Sora 1.0 / Bora train on them.

CSV: no header; column 0 the video path (relative to `root` unless absolute), column 1 the caption; more
columns are ignored. A clip is `num_frames` frames taken every `frame_interval` frames from a random start,
flipped horizontally with probability 0.5, its shorter side resized to the target and centre-cropped
(upstream `UCFCenterCropVideo`), and normalised to [-1, 1] by the VAE.

Errors are never skipped silently: a bad row, a missing file, an unreadable or too short video raises
`DatasetError` naming the CSV row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import DatasetError


@dataclass(frozen=True)
class Sample:
    row: int  # 1-based CSV row, for error messages
    path: Path
    caption: str


def read_csv(csv_path: str | Path, root: str | Path | None = None) -> list[Sample]:
    """Parse and check every row up front: two non-empty columns and an existing file."""
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such CSV file")
    samples = []
    with open(csv_path, newline="", encoding="utf-8") as stream:
        for row_number, row in enumerate(csv.reader(stream), start=1):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{csv_path} row {row_number}: expected 'video path,caption', got {row!r}")
            path = Path(row[0].strip())
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DatasetError(f"{csv_path} row {row_number}: video {path} does not exist")
            samples.append(Sample(row_number, path, row[1].strip()))
    if not samples:
        raise DatasetError(f"{csv_path}: no rows")
    return samples


def read_video(path: Path) -> np.ndarray:
    """All frames of a video file as uint8 [N, H, W, 3] (ffmpeg, via imageio-ffmpeg)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    if not frames:
        raise ValueError("no frames decoded")
    return np.stack(frames)


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, H, W] float: scale so the frame covers height×width (bilinear), then crop the centre."""
    _, _, h, w = frames.shape
    scale = max(height / h, width / w)
    if (h, w) != (height, width):
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        if (new_h, new_w) != (h, w):
            frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False)
        top, left = (frames.shape[2] - height) // 2, (frames.shape[3] - width) // 2
        frames = frames[:, :, top:top + height, left:left + width]
    return frames


class VideoTextDataset:
    """Clips for training: `window(i, rng)` picks a start and flip, `load(i, start, flip)` reads them."""

    def __init__(self, csv_path: str | Path, root: str | Path | None, num_frames: int, frame_interval: int,
                 height: int, width: int):
        if num_frames < 1 or frame_interval < 1:
            raise ValueError(f"num_frames={num_frames} and frame_interval={frame_interval} must be >= 1")
        self.samples = read_csv(csv_path, root)
        self.csv_path = Path(csv_path)
        self.num_frames = num_frames
        self.frame_interval = frame_interval
        self.height, self.width = height, width
        self.span = (num_frames - 1) * frame_interval + 1  # frames a clip covers in its source video
        self._lengths: dict[int, int] = {}
        self._last: tuple[int, np.ndarray] | None = None  # `window` then `load` of one clip decode it once

    def __len__(self) -> int:
        return len(self.samples)

    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    def _read(self, index: int) -> np.ndarray:
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        sample = self.samples[index]
        try:
            video = read_video(sample.path)
        except Exception as e:  # ffmpeg and imageio raise many types for a broken file
            raise DatasetError(f"{self.csv_path} row {sample.row}: cannot read video {sample.path} ({e})") from e
        if len(video) < self.span:
            raise DatasetError(f"{self.csv_path} row {sample.row}: video {sample.path} has {len(video)} frames; "
                               f"{self.num_frames} frames every {self.frame_interval} need {self.span}")
        self._lengths[index] = len(video)
        self._last = (index, video)
        return video

    def window(self, index: int, rng: np.random.Generator) -> tuple[int, bool]:
        """A random start frame and horizontal flip for clip `index` (reads the video once to learn its
        length)."""
        if index not in self._lengths:
            self._read(index)
        start = int(rng.integers(0, self._lengths[index] - self.span + 1))
        return start, bool(rng.random() < 0.5)

    def load(self, index: int, start: int, flip: bool) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] of clip `index` from `start`, flipped if asked, resized and cropped."""
        video = self._read(index)[start:start + self.span:self.frame_interval]  # [T, H0, W0, 3]
        frames = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float()  # [T, 3, H0, W0]
        if flip:
            frames = frames.flip(-1)
        frames = resize_center_crop(frames, self.height, self.width)  # [T, 3, H, W]
        return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # [T, H, W, 3]
