"""The demo's procedural clips, captions, eval measures and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demo.captions import HELD_OUT, TEMPLATES, TRAIN_TEMPLATES, caption
from demo.clips import make_clips, write_training_set
from demo.evaluate import CLASSES, NONE, evaluate, pure_noise, train_classifier
from demo.features import dominant_colour, features, frechet_distance, temporal_energy
from demo.procedural import DOMAINS, render, sample_attributes
from model.training.dataset import VideoTextDataset

SHIPPED = Path(__file__).resolve().parents[2] / "demo" / "weights" / "bora-demo"


def test_clips_are_seeded_uint8_videos_that_move():
    a, b = make_clips(2, seed=3), make_clips(2, seed=3)
    assert [c.domain for c in a] == list(DOMAINS) * 2
    for x, y in zip(a, b, strict=True):
        assert x.frames.shape == (16, 64, 64, 3) and x.frames.dtype == np.uint8
        assert np.array_equal(x.frames, y.frames) and x.caption == y.caption
        assert temporal_energy(x.frames) > 0.005


def test_held_out_template_is_never_used_for_training():
    assert HELD_OUT not in TRAIN_TEMPLATES and all(len(t) == HELD_OUT + 1 for t in TEMPLATES.values())
    clips = make_clips(20, seed=0)
    held_out = {caption(c.domain, c.attrs, HELD_OUT) for c in clips}
    assert not held_out & {c.caption for c in clips}


def test_captions_put_the_attributes_in_words():
    rng = np.random.default_rng(0)
    attrs = sample_attributes("cell", rng) | {"colour": "magenta", "speed": "fast", "count": "many",
                                              "dividing": True}
    text = caption("cell", attrs, 0)
    assert "magenta" in text and "quickly" in text and "many" in text and "divide" in text


def test_training_set_is_upstream_csv_of_mp4s(tmp_path):
    csv_path, clips = write_training_set(tmp_path, per_domain=1, seed=0)
    dataset = VideoTextDataset(csv_path, None, num_frames=16, frame_interval=1, height=64, width=64)
    assert dataset.captions() == [c.caption for c in clips]
    decoded = dataset.load(0, 0, False).numpy().astype(float)
    assert np.abs(decoded - clips[0].frames).mean() < 3  # near-lossless H.264


def test_colour_measure_reads_the_prompted_colour_of_real_clips():
    clips = make_clips(12, seed=7)
    checked = [(dominant_colour(c.frames, c.domain), c.attrs["colour"]) for c in clips if "colour" in c.attrs]
    assert len(checked) == 36 and all(got == wanted for got, wanted in checked)


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 2) == pytest.approx(16, rel=1e-3)


def test_classifier_knows_real_clips_and_rejects_noise():
    classifier = train_classifier(per_domain=30, check_per_domain=10)
    assert classifier.real_accuracy >= 0.9 and classifier.noise_as_domain == 0
    rng = np.random.default_rng(99)
    assert set(classifier.predict([pure_noise(rng) for _ in range(8)])) == {NONE}
    assert len(features([render("mri", {"speed": "slow"}, rng)])[0]) == classifier.model.n_features_in_
    assert CLASSES[-1] == NONE


@pytest.fixture(scope="module")
def shipped():
    from model.pipeline import BoraPipeline

    if not (SHIPPED / "model_index.json").is_file():
        pytest.fail(f"the demo model is missing from {SHIPPED}")
    return BoraPipeline.from_pretrained(SHIPPED, device="cpu")


def test_shipped_demo_model_is_small_and_labelled(shipped):
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    assert all(f.suffix != ".bin" for f in SHIPPED.rglob("*"))  # safetensors only
    assert shipped.name == "demo" and shipped.prediction_type == "v"
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert index["name"] == "demo"


def test_shipped_model_same_seed_same_video(shipped):
    a = shipped("An endoscopic view of pink mucosa", seed=4, num_inference_steps=3).frames
    b = shipped("An endoscopic view of pink mucosa", seed=4, num_inference_steps=3).frames
    assert a.shape == (1, 16, 64, 64, 3) and np.array_equal(a, b)


def test_evaluate_reports_every_figure(shipped):
    classifier = train_classifier(per_domain=30, check_per_domain=10)
    report, videos = evaluate(shipped, samples_per_domain=2, batch_size=8, classifier=classifier,
                              reference_per_domain=16, num_inference_steps=4)
    assert set(report.domains) == set(DOMAINS) and all(len(v) == 2 for v in videos.values())
    for row in report.domains.values():
        assert 0 <= row["accuracy"] <= 1 and row["temporal_energy"] > 0 and row["frechet"] >= 0
        assert sum(row["predicted"].values()) == 2
    assert report.overall["deterministic"] is True
    assert "overall" in report.table()
