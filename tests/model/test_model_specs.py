"""service/jobs/models.py knows the served models without torch; its defaults must be model/presets.py's."""

from __future__ import annotations

import pytest

from model.presets import BORA_DEFAULTS, DEMO_DEFAULTS, PRESETS, TINY_DEFAULTS
from model.schedulers import SAMPLERS as MODEL_SAMPLERS
from service.jobs.models import MODELS, SAMPLERS, SIZE_MULTIPLE


def test_the_service_serves_every_preset():
    assert MODELS.keys() == PRESETS.keys()


def test_the_service_knows_the_pipeline_samplers():
    assert set(SAMPLERS) == set(MODEL_SAMPLERS)
    assert all(set(spec.max_steps) == set(SAMPLERS) for spec in MODELS.values())


@pytest.mark.parametrize("name, defaults", [("bora", BORA_DEFAULTS), ("tiny", TINY_DEFAULTS), ("demo", DEMO_DEFAULTS)])
def test_service_spec_matches_the_preset(name, defaults):
    spec = MODELS[name]
    assert spec.name == name
    assert spec.trained == (defaults.num_frames, defaults.height, defaults.width)
    assert spec.fps == defaults.fps
    assert spec.default_steps == defaults.num_inference_steps
    assert spec.default_guidance == defaults.guidance_scale
    assert spec.default_sampler == defaults.sampler
    # ... and a request that leaves everything out is within the spec's own bounds.
    frames, height, width = spec.trained
    assert 1 <= frames <= spec.max_frames
    assert all(spec.min_side <= side <= spec.max_side and side % SIZE_MULTIPLE == 0 for side in (height, width))
    assert spec.default_sampler in spec.samplers and spec.default_steps <= spec.max_steps[spec.default_sampler]
