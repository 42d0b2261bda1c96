"""A folder written by `bora train` is served by the worker's job path as it is."""

from __future__ import annotations

import csv

import numpy as np

from demo.clips import write_mp4
from demo.procedural import DOMAINS, render, sample_attributes
from model.pipeline import BoraPipeline, file_sha256
from model.training.trainer import TrainConfig, Trainer
from service.jobs.schemas import JobStatus
from service.jobs.storage import LocalStorage


def test_trained_folder_serves_a_job(env, make_runtime, tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.csv", "w", newline="") as stream:
        for i, domain in enumerate(DOMAINS):
            write_mp4(render(domain, sample_attributes(domain, rng), rng, 4, 32), tmp_path / f"{i}.mp4")
            csv.writer(stream).writerow([f"{i}.mp4", f"a {domain} video"])
    out = Trainer(TrainConfig(data=str(tmp_path / "train.csv"), pipeline=str(tiny_model_dir), out=str(tmp_path / "out"),
                              num_frames=4, frame_interval=1, height=32, width=32, batch_size=2, lr=1e-3,
                              max_steps=2, device="cpu")).run()

    pipe = BoraPipeline.from_pretrained(out, device="cpu")
    runtime = make_runtime(pipe, LocalStorage(env.settings.storage_dir))
    payload, record = env.run_one(runtime, num_frames=4, height=32, width=32, num_inference_steps=2)
    assert record.status == JobStatus.succeeded, record.error
    trained = file_sha256(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert record.weights_sha256 == trained != file_sha256(
        tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert runtime.storage.local_path(record.outputs.video.key).stat().st_size > 0
