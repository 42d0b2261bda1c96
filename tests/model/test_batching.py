"""Batch-ready pipeline: prompts generated together, each with its own generator, give their solo frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.pipeline import BoraPipeline

pytestmark = pytest.mark.slow  # minutes on 2 cores: `make test-slow`, its own CI stage

SMALL = dict(num_frames=4, height=32, width=32, num_inference_steps=3)
PROMPTS = ["cells dividing under a microscope", "knee mri, sagittal view of the joint", "colonoscopy"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> BoraPipeline:
    return BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("sampler", ["iddpm", "ddim", "dpm-solver++"])
def test_each_batched_prompt_gets_its_solo_frames(pipe, sampler):
    """Prompts of different token counts (separate cross-attention groups) in one batch of 3."""
    seeds = [21, 22, 23]
    counts = [count for count, _ in pipe.text_encoder.token_counts(PROMPTS)]
    assert len(set(counts)) > 1
    batch = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], sampler=sampler,
                 **SMALL).frames
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds, strict=True)):
        alone = pipe(prompt, generator=[torch.Generator().manual_seed(seed)], sampler=sampler, **SMALL).frames[0]
        # equal up to fp32 GEMM blocking differences between batch sizes (at most one level of 255)
        assert np.abs(batch[i].astype(int) - alone.astype(int)).max() <= 1, (sampler, i)
