"""Worker throughput with batching: N compatible jobs run as one batch (BORA_WORKER_BATCH_SIZE=N) against the
same N jobs one at a time (batch size 1), side by side in one run, on the CPU.

    nice -n 10 .venv/bin/python bench/worker_batching.py [--jobs 4] [--rounds 3] [--model demo]

Each round queues N jobs (different prompts and seeds; same model, shape, steps and sampler, so they are
compatible) the way the API does (job record and RQ entry in one transaction), then the worker's real job
path drains the queue: RQ's in-process `SimpleWorker` running `worker.jobs.run_video_job` with the resident
pipeline, fenced state writes to Redis, MP4 + poster + sidecar encoding, upload to local storage. The figure
is jobs per second from the first enqueue to the last job `succeeded`. Rounds alternate batched and one at a
time, so machine noise hits both; the first round of each is warm-up. It also compares each batched job's
video with the solo video of the same prompt and seed: the frames the pipeline returned (recorded on their
way to the MP4 encoder) and the decoded MP4s. H.264 turns a one-level difference in a few pixels into
differences of several levels in their blocks, so the raw frames are the figure for "equal".

Model: `demo` (demo/weights/bora-demo, 16×64×64, its default 25 DDIM steps) or `tiny` (built into a temp
dir). Redis: BORA_REDIS_URL or 127.0.0.1:6379 DB 13, under a throw-away key prefix deleted afterwards.
Not measured: the API, process boundaries (the worker runs in this process), GPU batching (where the gain
differs: a GPU has idle width a batch fills; a CPU mostly has not), and queues of incompatible jobs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from redis import Redis
from rq import Queue, SimpleWorker

from service.jobs import jobstore, queueing
from service.jobs.config import Settings
from service.jobs.models import MODELS
from service.jobs.schemas import JobRecord, JobStatus, Stage, VideoInput, utcnow
from service.jobs.storage import LocalStorage
from worker import jobs
from worker.metrics import WorkerMetrics
from worker.video import read_mp4

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a beating human heart, echocardiography", "knee mri, sagittal view of the joint",
           "colonoscopy of the ascending colon", "cells dividing under a microscope, phase contrast",
           "ultrasound of the liver", "endoscopy of the stomach", "brain mri, axial slice", "blood cells flowing"]


def submit(r: Redis, settings: Settings, model: str, n: int) -> list[str]:
    spec = MODELS[model]
    frames, height, width = spec.trained
    ids = []
    for i in range(n):
        now = utcnow()
        inp = VideoInput(prompt=PROMPTS[i % len(PROMPTS)], num_frames=frames, height=height, width=width,
                         fps=spec.fps, num_inference_steps=spec.default_steps, guidance_scale=spec.default_guidance,
                         sampler=spec.default_sampler, seed=1000 + i)  # type: ignore[arg-type]
        record = JobRecord(id=jobstore.new_job_id(), status=JobStatus.queued, stage=Stage.queued, created_at=now,
                           updated_at=now, model=model, input=inp, seed=inp.seed, tenant="bench")
        jobstore.create(r, record, prefix=settings.key_prefix, enqueue=lambda pipe, record=record: queueing.enqueue(
            r, settings, queueing.payload_of(record), pipeline=pipe))
        ids.append(record.id)
    return ids


def drain(rt: jobs.Runtime, r: Redis, settings: Settings, ids: list[str], batch_size: int) -> float:
    """Seconds from the first job queued to the last one succeeded (jobs queued at the start of the timing)."""
    rt.settings = settings.model_copy(update={"worker_batch_size": batch_size})
    worker = SimpleWorker([Queue(settings.queue_name, connection=r)], connection=r,
                          name=f"{settings.key_prefix}-w{secrets.token_hex(2)}")
    started = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    elapsed = time.perf_counter() - started
    for job_id in ids:
        record = jobstore.get(r, job_id, prefix=settings.key_prefix)
        if record is None or record.status != JobStatus.succeeded:
            raise RuntimeError(f"job {job_id} did not succeed: {record and record.status} {record and record.error}")
    return elapsed


class RecordingPipeline:
    """The worker's pipeline, keeping each video it returns by (prompt, seed) for the comparison."""

    def __init__(self, pipe: object) -> None:
        self._pipe = pipe
        self.videos: dict[tuple[str, int], list[np.ndarray]] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._pipe, name)

    def __call__(self, prompt: list[str], *, seed: list[int], **kwargs: object) -> object:
        out = self._pipe(prompt, seed=seed, **kwargs)  # type: ignore[operator]
        for p, s, frames in zip(prompt, seed, out.frames, strict=True):
            self.videos[(p, s)] = [*self.videos.get((p, s), [])[-1:], frames.astype(int)]  # the last two
        return out


def frames_of(rt: jobs.Runtime, r: Redis, settings: Settings, job_id: str) -> np.ndarray:
    record = jobstore.get(r, job_id, prefix=settings.key_prefix)
    assert record is not None and record.outputs is not None
    path = rt.storage.local_path(record.outputs.video.key)
    assert path is not None
    return read_mp4(path).astype(int)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="N: jobs per round, and the batch size")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of each mode (after 1 warm-up)")
    parser.add_argument("--model", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--redis-url", default=os.environ.get("BORA_REDIS_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    from model.pipeline import BoraPipeline
    from model.presets import make_tiny

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    prefix = "bora-bench-" + secrets.token_hex(4)
    tmp = Path(tempfile.mkdtemp(prefix=prefix + "-"))
    model_dir = REPO_ROOT / "demo/weights/bora-demo" if args.model == "demo" else make_tiny(tmp / "tiny")
    pipe = RecordingPipeline(BoraPipeline.from_pretrained(model_dir, device="cpu"))
    settings = Settings(redis_url=args.redis_url, key_prefix=prefix, data_dir=tmp, storage_dir=tmp / "videos",
                        model_preset=args.model, worker_metrics_port=0)
    r = Redis.from_url(args.redis_url)
    rt = jobs.Runtime(pipeline=pipe, redis=r, settings=settings, storage=LocalStorage(tmp / "videos"),
                      metrics=WorkerMetrics(), worker_id=f"{prefix}-worker")
    jobs.install(rt)
    spec = MODELS[args.model]
    print(f"model {args.model}: {spec.trained[0]}×{spec.trained[1]}×{spec.trained[2]}, {spec.default_steps} "
          f"{spec.default_sampler} steps, guidance {spec.default_guidance}; CPU, {torch.get_num_threads()} torch "
          f"threads, {os.cpu_count()} cores; N = {args.jobs}")
    seconds: dict[int, list[float]] = {args.jobs: [], 1: []}
    last_ids: dict[int, list[str]] = {}
    all_ids: list[str] = []
    try:
        for round_index in range(args.rounds + 1):
            for batch_size in ((args.jobs, 1) if round_index % 2 == 0 else (1, args.jobs)):
                ids = submit(r, settings, args.model, args.jobs)
                elapsed = drain(rt, r, settings, ids, batch_size)
                last_ids[batch_size] = ids
                all_ids += ids
                label = "warm-up" if round_index == 0 else f"round {round_index}"
                print(f"  {label:<8} batch size {batch_size}: {args.jobs} jobs in {elapsed:6.2f} s "
                      f"({args.jobs / elapsed:.3f} jobs/s)")
                if round_index > 0:
                    seconds[batch_size].append(elapsed)
        ratios = [solo / batched for batched, solo in zip(seconds[args.jobs], seconds[1], strict=True)]
        print(f"throughput, median of {args.rounds} rounds: batched {args.jobs / statistics.median(seconds[args.jobs]):.3f}"
              f" jobs/s, one at a time {args.jobs / statistics.median(seconds[1]):.3f} jobs/s; batched / one at a time"
              f" per round {', '.join(f'{x:.2f}×' for x in ratios)}: median {statistics.median(ratios):.2f}×")
        # The last round ran one mode after the other on the same prompts and seeds.
        raw = [np.abs(np.subtract(*recorded)) for recorded in pipe.videos.values()]
        mp4 = [np.abs(frames_of(rt, r, settings, b) - frames_of(rt, r, settings, s))
               for b, s in zip(last_ids[args.jobs], last_ids[1], strict=True)]
        print(f"frames, each batched job against the solo run of the same prompt and seed: pipeline output "
              f"largest difference {max(int(d.max()) for d in raw)} of 255 in "
              f"{max(float(np.mean(d > 0)) for d in raw):.4%} of values at most; decoded MP4s largest difference "
              f"{max(int(d.max()) for d in mp4)}, mean {statistics.mean(float(d.mean()) for d in mp4):.3f} (H.264)")
    finally:
        jobs.install(None)
        keys = list(r.scan_iter(match=f"*{prefix}*", count=1000))
        for job_id in all_ids:
            keys += list(r.scan_iter(match=f"*{job_id}*", count=1000))
        if keys:
            r.delete(*set(keys))


if __name__ == "__main__":
    main()
