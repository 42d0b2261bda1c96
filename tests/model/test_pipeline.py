"""BoraPipeline on the tiny preset: save/load round trip, per-prompt seeding, input checks, failure modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.errors import Interrupted, InvalidInput, NumericalError
from model.pipeline import BoraPipeline

SMALL = dict(num_frames=4, height=32, width=32, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> BoraPipeline:
    return BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")


def test_output_shape_dtype_and_reported_seed(pipe):
    out = pipe("an endoscopy of the stomach", seed=7, **SMALL)
    assert out.frames.shape == (1, 4, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.seeds == [7]
    assert out.frames.std() > 1.0, "a random tiny model still yields a non-flat video"


def test_saved_and_reloaded_pipeline_gives_the_same_frames(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    reloaded = BoraPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert reloaded.weights_sha256 == pipe.weights_sha256
    first = pipe("cardiac ultrasound, four chamber view", seed=3, **SMALL).frames
    second = reloaded("cardiac ultrasound, four chamber view", seed=3, **SMALL).frames
    np.testing.assert_array_equal(first, second)


def test_a_sample_does_not_depend_on_its_batch_position(pipe):
    alone = pipe("cells dividing under a microscope", seed=11, **SMALL).frames[0]
    batch = pipe(["knee mri, sagittal", "cells dividing under a microscope"], seed=[5, 11], **SMALL).frames
    assert np.abs(batch[1].astype(int) - alone.astype(int)).max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_fast_samplers_run_and_are_seeded(pipe, sampler):
    a = pipe("colonoscopy", seed=1, sampler=sampler, **SMALL).frames
    b = pipe("colonoscopy", seed=1, sampler=sampler, **SMALL).frames
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(height=40), "height=40"),
        (dict(width=8), "width=8"),
        (dict(num_frames=0), "num_frames=0"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(sampler="euler"), "sampler='euler'"),
        (dict(guidance_scale=-1.0), "guidance_scale=-1.0"),
    ],
)
def test_invalid_requests_fail_up_front_with_the_value_quoted(pipe, change, message):
    with pytest.raises(InvalidInput, match=message.replace("+", r"\+")):
        pipe("x-ray", seed=0, **{**SMALL, **change})


def test_prompt_cut_at_the_token_limit_is_reported(pipe):
    long_prompt = " ".join(["endoscopic view of the duodenal mucosa with villi"] * 40)
    out = pipe(long_prompt, seed=0, **SMALL)
    assert out.truncated == [True] and out.token_counts[0] > 120
    assert pipe("short prompt", seed=0, **SMALL).truncated == [False]


def test_step_callback_and_cancel_between_steps(pipe):
    seen = []
    with pytest.raises(Interrupted):
        pipe("ultrasound", seed=0, **SMALL,
             callback_on_step_end=lambda _p, i, t, total: seen.append((i, total)),
             should_cancel=lambda: len(seen) >= 2)
    assert seen == [(0, 3), (1, 3)]


def test_non_finite_latent_raises_numerical_error(tiny_model_dir):
    broken = BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")
    with torch.no_grad():
        broken.transformer.final_layer.linear.bias.fill_(float("inf"))
    with pytest.raises(NumericalError):
        broken("mri", seed=0, **SMALL)


def test_a_folder_without_model_index_is_refused_clearly(tmp_path):
    from model.errors import CheckpointError

    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        BoraPipeline.from_pretrained(tmp_path, device="cpu")
