import time

import numpy as np
import pytest

from worker.video import SYNTHETIC_LABEL, encode_mp4, probe_mp4, read_mp4, top_level_boxes, write_thumbnail


def _frames(t: int, h: int, w: int) -> np.ndarray:
    # Smooth moving gradients: compressible like real output, and frame-distinguishable.
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (xx + 4 * i) % 256
        out[i, ..., 1] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
        out[i, ..., 2] = i * 255 // max(t - 1, 1)
    return out


def test_round_trip_40x256x256(tmp_path):
    frames = _frames(40, 256, 256)
    path = tmp_path / "v.mp4"
    start = time.perf_counter()
    encode_mp4(frames, 8, path, {"comment": SYNTHETIC_LABEL, "title": "a heart beating"})
    elapsed = time.perf_counter() - start
    assert elapsed < 20, elapsed

    info = probe_mp4(path)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (40, 256, 256, 8.0)
    assert info["duration_s"] == pytest.approx(5.0)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["tags"]["comment"] == SYNTHETIC_LABEL
    assert info["tags"]["title"] == "a heart beating"
    assert info["faststart"]
    assert top_level_boxes(path)[0] == "ftyp"

    decoded = read_mp4(path)
    assert decoded.shape == frames.shape
    # lossy, but close: mean absolute error of a few levels
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6


@pytest.mark.parametrize("shape", [(1, 64, 64), (7, 48, 80)])
def test_odd_counts_and_non_square(tmp_path, shape):
    path = tmp_path / "v.mp4"
    encode_mp4(_frames(*shape), 4, path, {})
    info = probe_mp4(path)
    assert (info["frames"], info["height"], info["width"]) == shape


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 64, 64), np.uint8),
        np.zeros((2, 64, 64, 3), np.float32),
        np.zeros((2, 63, 64, 3), np.uint8),
    ],
)
def test_rejects_bad_frames(tmp_path, frames):
    with pytest.raises(ValueError):
        encode_mp4(frames, 8, tmp_path / "v.mp4", {})


def test_rejects_bad_metadata_key(tmp_path):
    with pytest.raises(ValueError):
        encode_mp4(_frames(2, 64, 64), 8, tmp_path / "v.mp4", {"bad key=": "x"})


def test_control_characters_in_tags_never_reach_ffmpeg(tmp_path):
    path = tmp_path / "v.mp4"
    encode_mp4(_frames(2, 64, 64), 8, path, {"title": "heart\x00beat\nline\x1b[31m red"})
    assert probe_mp4(path)["tags"]["title"] == "heart beat line [31m red"


def test_thumbnail_is_jpeg(tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "t.jpg"
    frame = _frames(1, 64, 96)[0]
    write_thumbnail(frame, path)
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    back = iio.imread(path)
    assert back.shape == (64, 96, 3)
