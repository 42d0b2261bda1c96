"""Pyramid attention broadcast: off changes nothing, `every=1` is the exact run, and a real schedule reuses
outputs only inside its timestep window, forgets them when the batch changes, and stays near the exact video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.attention_broadcast import AttentionBroadcast, AttentionBroadcastConfig
from model.errors import InvalidInput
from model.pipeline import BoraPipeline

SMALL = dict(num_frames=4, height=32, width=32, num_inference_steps=10, sampler="ddim", seed=3)
PROMPT = "cells dividing under a microscope"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> BoraPipeline:
    return BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture
def exact(pipe) -> np.ndarray:
    pipe.disable_attention_broadcast()
    return pipe(PROMPT, **SMALL).frames


def test_recomputing_every_step_is_the_exact_run(pipe, exact):
    pipe.enable_attention_broadcast(AttentionBroadcastConfig(1, 1, 1, timestep_range=(0, 999)))
    try:
        frames = pipe(PROMPT, **SMALL).frames
        state = pipe.transformer.attention_broadcast
        assert sum(state.reused.values()) == 0
    finally:
        pipe.disable_attention_broadcast()
    np.testing.assert_array_equal(frames, exact)


def test_a_schedule_reuses_inside_its_window_and_stays_near_the_exact_video(pipe, exact):
    config = AttentionBroadcastConfig(spatial_every=2, temporal_every=3, cross_every=5, timestep_range=(100, 800))
    pipe.enable_attention_broadcast(config)
    try:
        frames = pipe(PROMPT, **SMALL).frames
        state = pipe.transformer.attention_broadcast
    finally:
        pipe.disable_attention_broadcast()
    depth = len(pipe.transformer.blocks)
    # DDIM-10 visits t = 900, 800, ..., 0: steps at 800..100 (8 of them) are inside the window. The first
    # inside step may reuse the output of t=900; every kind computes on its schedule from there.
    for kind, every in (("spatial", 2), ("temporal", 3), ("cross", 5)):
        calls = state.computed[kind] + state.reused[kind]
        assert calls == 10 * depth
        assert state.reused[kind] > 0 and state.reused[kind] % depth == 0
        assert state.reused[kind] // depth <= 8 - 8 // every
    assert not np.array_equal(frames, exact)
    assert np.abs(frames.astype(int) - exact.astype(int)).mean() < 8  # of 255: a nearby video, not another one


def test_outputs_are_forgotten_when_the_batch_changes():
    state = AttentionBroadcast(AttentionBroadcastConfig(spatial_every=4, timestep_range=(0, 999)))
    computed = []
    state.begin_step(500, (2, 16, 8))
    state.attend("spatial", 0, lambda: computed.append(1) or torch.zeros(2))
    state.begin_step(490, (2, 16, 8))
    state.attend("spatial", 0, lambda: computed.append(2) or torch.zeros(2))
    state.begin_step(480, (1, 16, 8))  # a job left the batch
    state.attend("spatial", 0, lambda: computed.append(3) or torch.zeros(1))
    assert computed == [1, 3]


def test_broadcast_and_compiled_steps_exclude_each_other(pipe):
    pipe.enable_attention_broadcast()
    try:
        with pytest.raises(InvalidInput, match="eager"):
            pipe.accelerate(compile=True)
    finally:
        pipe.disable_attention_broadcast()
    with pytest.raises(ValueError, match="spatial_every"):
        AttentionBroadcastConfig(spatial_every=0)


def test_a_folder_can_default_to_broadcast(pipe, tmp_path):
    """The per-model default lives in the folder's scheduler config and is switched on at load."""
    import dataclasses

    saved = BoraPipeline(pipe.transformer, pipe.text_encoder, pipe.vae,
                         dataclasses.replace(pipe.defaults, attention_broadcast=(2, 3, 5)), name=pipe.name)
    saved.save_pretrained(tmp_path / "pab")
    saved.disable_attention_broadcast()  # the transformer is the module's shared one
    loaded = BoraPipeline.from_pretrained(tmp_path / "pab", device="cpu")
    assert loaded.defaults.attention_broadcast == (2, 3, 5)
    config = loaded.transformer.attention_broadcast.config
    assert (config.spatial_every, config.temporal_every, config.cross_every) == (2, 3, 5)
