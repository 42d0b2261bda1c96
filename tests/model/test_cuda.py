"""fp16 on CUDA: runs only where a GPU is present (skipped on CPU-only CI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.pipeline import BoraPipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fp16_pipeline_on_cuda_with_t5_on_cpu_matches_fp32(tiny_model_dir):
    gpu = BoraPipeline.from_pretrained(tiny_model_dir, device="cuda", text_encoder_device="cpu")
    assert gpu.dtype == torch.float16 and gpu.text_encoder.device.type == "cpu"
    cpu = BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")
    args = dict(num_frames=8, height=64, width=64, num_inference_steps=5, seed=3)
    half = gpu("endoscopy of the stomach", **args).frames.astype(np.int16)
    full = cpu("endoscopy of the stomach", **args).frames.astype(np.int16)
    assert np.abs(half - full).mean() < 3.0


def test_default_device_is_cuda_fp16(tiny_model_dir):
    pipe = BoraPipeline.from_pretrained(tiny_model_dir)
    assert pipe.device.type == "cuda" and pipe.dtype == torch.float16


@pytest.mark.parametrize("mode", ["cuda_graphs", "compile"])
def test_accelerated_steps_give_the_eager_frames(tiny_model_dir, mode):
    pipe = BoraPipeline.from_pretrained(tiny_model_dir, device="cuda")
    args = dict(num_frames=8, height=64, width=64, num_inference_steps=5)
    eager = pipe(["endoscopy of the stomach", "knee mri"], seed=[3, 4], **args).frames.astype(np.int16)
    pipe.accelerate(**{mode: True})
    for _ in range(2):  # the second run replays graphs captured (or code compiled) by the first
        fast = pipe(["endoscopy of the stomach", "knee mri"], seed=[3, 4], **args).frames.astype(np.int16)
        assert np.abs(fast - eager).max() <= 2
