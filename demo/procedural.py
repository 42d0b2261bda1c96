"""Procedural biomedical clips for the demo model: four domains with their own layout, palette and motion.

Each renderer draws one clip as float32 [T, H, W, 3] in [0, 1] with numpy only (vectorised over frames,
pixels and objects), from a `numpy.random.Generator` and a dict of attributes that the captions put in
words. What tells the domains apart, on purpose for a small model:

- cell microscopy: dark field, fluorescent round cells (one colour per clip) with darker nuclei, drifting;
  some divide into two during the clip;
- ultrasound: black frame with a speckled sector fan from the top edge; a dark chamber with a bright wall
  beats (its radius pulses) at the prompted heart rate; grey or sepia;
- real-time MRI: grey mid-sagittal head on black, bright skull ring, dark airway, a tongue that moves up and
  down at the prompted speech rate;
- endoscopy: pink/red/orange mucosa tunnel around a dark lumen, folds (rings) moving outwards as the scope
  moves forward, specular highlights.

Per-frame pixel noise is kept small, so a clip's frame differences are its motion (what `bora eval` compares
as temporal energy) rather than sensor noise that any VAE smooths away: with 2% noise, an MRI clip's frame
differences were 80% noise, and real clips through the demo VAE kept only 38% of them.

These are synthetic pictures for a demo, not medical images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DOMAINS = ("cell", "ultrasound", "mri", "endoscopy")
NUM_FRAMES = 16
SIZE = 64
FPS = 8

CELL_COLOURS = {
    "green": (0.25, 1.0, 0.35),
    "red": (1.0, 0.22, 0.18),
    "blue": (0.3, 0.5, 1.0),
    "yellow": (1.0, 0.9, 0.2),
    "magenta": (1.0, 0.3, 0.95),
}
ENDO_COLOURS = {
    "pink": (0.98, 0.62, 0.66),
    "red": (0.86, 0.2, 0.16),
    "orange": (0.96, 0.56, 0.24),
}
ULTRASOUND_TINTS = {"grey": (1.0, 1.0, 1.0), "sepia": (1.0, 0.82, 0.6)}
# The colour words a caption may carry, per domain (what `bora eval` checks adherence against).
COLOUR_WORDS = {"cell": CELL_COLOURS, "ultrasound": ULTRASOUND_TINTS, "endoscopy": ENDO_COLOURS}
SPEEDS = ("slow", "fast")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1]: (y [H, 1], x [1, W])."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return axis[:, None], axis[None, :]


def _smooth(field: np.ndarray, passes: int = 1) -> np.ndarray:
    """Cheap blur of the last two axes (3-tap box, wrapping), to give speckle a grain size."""
    for _ in range(passes):
        field = (field + np.roll(field, 1, -1) + np.roll(field, -1, -1)) / 3
        field = (field + np.roll(field, 1, -2) + np.roll(field, -1, -2)) / 3
    return field


def sample_attributes(domain: str, rng: np.random.Generator) -> dict:
    """Draw the attributes a clip is rendered with (and captioned from)."""
    speed = SPEEDS[rng.integers(2)]
    if domain == "cell":
        return {"colour": list(CELL_COLOURS)[rng.integers(len(CELL_COLOURS))], "speed": speed,
                "count": ("few", "many")[rng.integers(2)], "dividing": bool(rng.random() < 0.5)}
    if domain == "ultrasound":
        return {"colour": list(ULTRASOUND_TINTS)[rng.integers(2)], "speed": speed}
    if domain == "mri":
        return {"speed": speed}
    if domain == "endoscopy":
        return {"colour": list(ENDO_COLOURS)[rng.integers(len(ENDO_COLOURS))], "speed": speed}
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def render_cell(attrs: dict, rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    y, x = _grid(size)
    t = np.arange(frames, dtype=np.float32)[:, None, None, None]  # [T, 1, 1, 1]
    n = int(rng.integers(3, 6) if attrs["count"] == "few" else rng.integers(8, 12))
    step = 0.018 if attrs["speed"] == "slow" else 0.05  # drift per frame, in [-1, 1] units
    angle = rng.uniform(0, 2 * np.pi, n)
    speed = step * rng.uniform(0.7, 1.3, n)
    cx = rng.uniform(-0.8, 0.8, n) + np.cos(angle) * speed * (t[..., 0, 0, 0][:, None] - frames / 2)  # [T, n]
    cy = rng.uniform(-0.8, 0.8, n) + np.sin(angle) * speed * (t[..., 0, 0, 0][:, None] - frames / 2)  # [T, n]
    radius = rng.uniform(0.13, 0.18, n).astype(np.float32)
    # dividing cells: two daughters start on top of each other at half brightness, then move apart
    split = np.full(n, np.inf, dtype=np.float32)
    if attrs["dividing"]:
        k = int(rng.integers(1, 3))
        split[:k] = rng.uniform(2, frames / 2, k)
    since = np.clip(t[..., 0, 0, 0][:, None] - split, 0, None)  # [T, n] frames since the split
    axis = rng.uniform(0, np.pi, n)
    dx, dy = np.cos(axis) * since * 0.035, np.sin(axis) * since * 0.035  # [T, n]
    centres_x = np.concatenate([cx + dx, cx - dx], axis=1)  # [T, 2n]
    centres_y = np.concatenate([cy + dy, cy - dy], axis=1)
    divides = np.isfinite(split)
    half = np.where(divides, 0.5 + 0.5 * np.clip(since / 2, 0, 1), 1.0)  # [T, n]
    scale = np.concatenate([half, np.where(divides, half, 0.0)], axis=1)  # [T, 2n]
    # gaussians are separable: sum_n gy[n, h] * gx[n, w] is one batched matmul per frame
    intensity = np.zeros((frames, size, size), dtype=np.float32)
    for width, gain in ((0.75, 1.0), (0.3, -0.55)):  # the cell body, minus a darker nucleus
        sig = np.concatenate([radius, radius])[None, :, None] * width  # [1, 2n, 1]
        gx = np.exp(-((x[0][None, None, :] - centres_x[:, :, None]) ** 2) / (2 * sig**2))  # [T, 2n, W]
        gy = np.exp(-((y[:, 0][None, None, :] - centres_y[:, :, None]) ** 2) / (2 * sig**2))  # [T, 2n, H]
        intensity += gain * np.einsum("tnh,tnw->thw", gy * scale[:, :, None], gx).astype(np.float32)
    intensity = np.clip(intensity, 0, 1.2)
    colour = np.asarray(CELL_COLOURS[attrs["colour"]], dtype=np.float32)
    background = 0.04 + 0.02 * _smooth(rng.random((size, size), dtype=np.float32), 2)
    noise = 0.005 * rng.standard_normal((frames, size, size, 1)).astype(np.float32)
    return background[None, :, :, None] + intensity[..., None] * colour + noise


def render_ultrasound(attrs: dict, rng: np.random.Generator, frames: int = NUM_FRAMES,
                      size: int = SIZE) -> np.ndarray:
    y, x = _grid(size)
    apex_y = -1.05
    radius = np.sqrt(x**2 + (y - apex_y) ** 2)  # [H, W]
    theta = np.arctan2(x, y - apex_y)  # 0 straight down
    half_angle = np.deg2rad(rng.uniform(33, 40))
    fan = (np.abs(theta) < half_angle) & (radius > 0.25) & (radius < 1.95)
    edge = np.clip((half_angle - np.abs(theta)) / 0.05, 0, 1) * np.clip((1.95 - radius) / 0.05, 0, 1)
    speckle = _smooth(rng.rayleigh(0.5, (size, size)).astype(np.float32), 1)
    tissue = (0.55 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)) * np.exp(-radius)) * np.exp(-0.35 * radius)
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    cycles = rng.uniform(0.8, 1.2) if attrs["speed"] == "slow" else rng.uniform(2.3, 2.9)
    beat = np.sin(2 * np.pi * cycles * t / NUM_FRAMES + rng.uniform(0, 2 * np.pi))  # [T, 1, 1]
    cx, cy = rng.uniform(-0.2, 0.2), rng.uniform(0.15, 0.45)
    rx, ry = rng.uniform(0.28, 0.36), rng.uniform(0.22, 0.3)
    pulse = 1 + 0.3 * beat
    ell = np.sqrt(((x - cx) / (rx * pulse)) ** 2 + ((y - cy) / (ry * pulse)) ** 2)  # [T, H, W]
    chamber = np.clip((1 - ell) / 0.15, 0, 1)  # dark blood inside
    wall = np.exp(-((ell - 1.1) ** 2) / 0.02)  # bright myocardium around it
    drift = 0.03 * rng.standard_normal((frames, size, size)).astype(np.float32)  # speckle decorrelation
    image = (tissue * (speckle + drift) * (1 - 0.9 * chamber) + 0.6 * wall * speckle) * fan * edge
    tint = np.asarray(ULTRASOUND_TINTS[attrs["colour"]], dtype=np.float32)
    return np.clip(image, 0, 1.2)[..., None] * tint


def render_mri(attrs: dict, rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    y, x = _grid(size)
    cx, cy = rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.05)
    rx, ry = rng.uniform(0.7, 0.8), rng.uniform(0.8, 0.9)
    head = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)  # [H, W]
    inside = np.clip((1 - head) / 0.04, 0, 1)
    skull = np.exp(-((head - 0.95) ** 2) / 0.003)
    brain = np.clip((0.8 - np.sqrt(((x - cx - 0.08) / 0.6) ** 2 + ((y - cy + 0.3) / 0.45) ** 2)) / 0.1, 0, 1)
    # airway: a dark band from the mouth (front, low) curving down the throat
    front = -1  # the face looks left; training's random flip shows both sides
    airway_x = cx + front * 0.1 + 0.25 * (y - cy) * front
    airway = np.exp(-((x - airway_x) ** 2) / 0.006) * (y > cy + 0.15)
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    cycles = rng.uniform(0.8, 1.2) if attrs["speed"] == "slow" else rng.uniform(2.3, 2.9)
    lift = 0.2 * np.sin(2 * np.pi * cycles * t / NUM_FRAMES + rng.uniform(0, 2 * np.pi))  # [T, 1, 1]
    tongue_x, tongue_y = cx + front * 0.3, cy + 0.42 - lift
    tongue = np.exp(-(((x - tongue_x) / 0.2) ** 2 + ((y - tongue_y) / 0.11) ** 2))  # [T, H, W]
    tissue = 0.32 + 0.1 * _smooth(rng.random((size, size), dtype=np.float32), 2)
    image = inside * (tissue + 0.25 * brain) + 0.55 * skull
    image = image * (1 - 0.85 * airway) + 0.45 * tongue * inside
    noise = 0.006 * rng.standard_normal((frames, size, size)).astype(np.float32)
    return np.clip(image + noise, 0, 1.1)[..., None] * np.ones(3, dtype=np.float32)


def render_endoscopy(attrs: dict, rng: np.random.Generator, frames: int = NUM_FRAMES,
                     size: int = SIZE) -> np.ndarray:
    y, x = _grid(size)
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    wander = rng.uniform(0, 2 * np.pi)
    lx = rng.uniform(-0.25, 0.25) + 0.08 * np.sin(2 * np.pi * t / NUM_FRAMES / 2 + wander)  # [T, 1, 1]
    ly = rng.uniform(-0.25, 0.25) + 0.08 * np.cos(2 * np.pi * t / NUM_FRAMES / 2 + wander)
    r = np.sqrt((x - lx) ** 2 + (y - ly) ** 2)  # [T, H, W]
    rate = rng.uniform(0.04, 0.06) if attrs["speed"] == "slow" else rng.uniform(0.1, 0.13)  # fold cycles per frame
    phase = 1.6 / (r + 0.25) / 2.2 + rate * t  # in cycles; a crest's radius grows with t: folds run outwards
    folds = 0.75 + 0.25 * np.sin(2 * np.pi * phase)
    lumen = np.clip((r - 0.1) / 0.35, 0, 1) ** 1.5  # dark centre, lit walls
    vignette = np.clip(1.35 - 0.45 * (x**2 + y**2), 0, 1)
    base = np.asarray(ENDO_COLOURS[attrs["colour"]], dtype=np.float32)
    image = (lumen * folds * vignette)[..., None] * base
    # specular highlights: small white spots riding on the folds
    angles = rng.uniform(0, 2 * np.pi, 4)
    spot_r = (rng.uniform(0.35, 0.8, 4) + rate * 1.2 * t[..., 0, 0][:, None]) % 1.0 + 0.3  # [T, 4]
    sx = lx[..., 0, 0][:, None] + np.cos(angles) * spot_r
    sy = ly[..., 0, 0][:, None] + np.sin(angles) * spot_r
    gx = np.exp(-((x[0][None, None, :] - sx[:, :, None]) ** 2) / 0.002)  # [T, 4, W]
    gy = np.exp(-((y[:, 0][None, None, :] - sy[:, :, None]) ** 2) / 0.002)  # [T, 4, H]
    spots = np.einsum("tnh,tnw->thw", gy, gx)  # [T, H, W]
    image = image + 0.7 * np.clip(spots, 0, 1)[..., None]
    return image + 0.015 * rng.standard_normal((frames, size, size, 1)).astype(np.float32)


RENDERERS: dict[str, Callable[..., np.ndarray]] = {
    "cell": render_cell,
    "ultrasound": render_ultrasound,
    "mri": render_mri,
    "endoscopy": render_endoscopy,
}


def render(domain: str, attrs: dict, rng: np.random.Generator, frames: int = NUM_FRAMES,
           size: int = SIZE) -> np.ndarray:
    """One clip as uint8 [T, H, W, 3]."""
    clip = RENDERERS[domain](attrs, rng, frames, size)
    return (np.clip(clip, 0, 1) * 255 + 0.5).astype(np.uint8)
