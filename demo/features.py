"""Video features for the demo's domain classifier, Fréchet distance and attribute checks (numpy only).

A clip is uint8 [T, H, W, 3]. The features describe layout (the mean frame at 8×8), colour (channel means
and spreads, saturation, a brightness histogram), structure (radial profile, fine detail) and motion (mean
absolute frame difference at lags 1, 2 and 4, and where in the frame it happens).
"""

from __future__ import annotations

import numpy as np

from demo.procedural import CELL_COLOURS, ENDO_COLOURS


def _pool(images: np.ndarray, cells: int) -> np.ndarray:
    """Average-pool the last two spatial axes [..., H, W] to [..., cells, cells]."""
    h, w = images.shape[-2:]
    return images.reshape(*images.shape[:-2], cells, h // cells, cells, w // cells).mean(axis=(-3, -1))


def temporal_energy(clip: np.ndarray) -> float:
    """Mean |frame difference| in [0, 1] units: motion plus flicker."""
    frames = clip.astype(np.float32) / 255.0
    return float(np.abs(np.diff(frames, axis=0)).mean())


def clip_features(clip: np.ndarray) -> np.ndarray:
    frames = clip.astype(np.float32) / 255.0  # [T, H, W, 3]
    grey = frames.mean(-1)  # [T, H, W]
    mean_frame = frames.mean(0).transpose(2, 0, 1)  # [3, H, W]
    layout = _pool(mean_frame, 8).ravel()  # 192
    motion_map = _pool(np.abs(np.diff(grey, axis=0)).mean(0), 4).ravel()  # 16
    channel = np.concatenate([frames.mean((0, 1, 2)), frames.std((0, 1, 2))])  # 6
    saturation = [(frames.max(-1) - frames.min(-1)).mean()]  # 1
    histogram = np.histogram(grey, bins=8, range=(0, 1))[0] / grey.size  # 8
    lags = [np.abs(grey[lag:] - grey[:-lag]).mean() for lag in (1, 2, 4)]  # 3
    blurred = (grey + np.roll(grey, 1, -1) + np.roll(grey, -1, -1) + np.roll(grey, 1, -2) + np.roll(grey, -1, -2)) / 5
    detail = [np.abs(grey - blurred).mean()]  # 1
    h, w = grey.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (min(h, w) / 2)
    rings = [grey.mean(0)[(radius >= lo) & (radius < hi)].mean() for lo, hi in
             ((0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (1.0, 1.5))]  # 5
    return np.concatenate([layout, motion_map, channel, saturation, histogram, lags, detail, rings]).astype(
        np.float32)


def features(clips) -> np.ndarray:
    return np.stack([clip_features(clip) for clip in clips])


def dominant_colour(clip: np.ndarray, domain: str) -> str | None:
    """The palette word whose hue the clip's bright pixels are closest to (None: no colour attribute)."""
    frames = clip.astype(np.float32).reshape(-1, 3) / 255.0
    brightness = frames.max(-1)
    if domain == "ultrasound":
        bright = frames[brightness >= np.quantile(brightness, 0.9)]
        red, blue = bright[:, 0].mean(), bright[:, 2].mean()
        return "sepia" if blue < 0.8 * red else "grey"
    palette = {"cell": CELL_COLOURS, "endoscopy": ENDO_COLOURS}.get(domain)
    if palette is None:
        return None
    quantile = 0.95 if domain == "cell" else 0.5
    mean = frames[brightness >= np.quantile(brightness, quantile)].mean(0)
    chroma = mean / (np.linalg.norm(mean) + 1e-8)
    scores = {name: float(chroma @ (np.array(rgb) / np.linalg.norm(rgb))) for name, rgb in palette.items()}
    return max(scores, key=scores.get)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between two feature sets [N, D] (as FID/FVD compute it)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
