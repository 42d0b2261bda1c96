"""Batching in the worker (worker/batch.py) on real parts: the in-process RQ worker, the tiny pipeline, a real
Redis, LocalStorage, and a client thread cancelling or taking over a job while the batch runs."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pytest
from redis import Redis
from rq.job import Job

from service.jobs import jobstore, queueing
from service.jobs.errors import StorageError
from service.jobs.schemas import JobStatus
from service.jobs.storage import LocalStorage
from worker.video import read_mp4

PROMPTS = ["a beating heart, ultrasound", "knee mri, sagittal view of the joint", "colonoscopy",
           "cells dividing under a microscope, phase contrast, time lapse"]


def _batches(caplog) -> list[list[str]]:
    return [r.jobs for r in caplog.records if getattr(r, "event", None) == "worker.batch"]


def _batch_size(runtime, size: int) -> None:
    runtime.settings = runtime.settings.model_copy(update={"worker_batch_size": size})


def _frames(runtime, record) -> np.ndarray:
    return read_mp4(runtime.storage.local_path(record.outputs.video.key))


class RecordingPipeline:
    """The real pipeline, keeping every video it returns by (prompt, seed): the raw frames, before H.264."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.videos: dict[tuple[str, int], list[np.ndarray]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, prompt: list[str], *, seed: list[int], **kwargs: Any) -> Any:
        out = self._pipe(prompt, seed=seed, **kwargs)
        for p, s, frames in zip(prompt, seed, out.frames, strict=True):
            self.videos.setdefault((p, s), []).append(frames.astype(int))
        return out


def test_compatible_jobs_run_as_one_batch_each_with_its_solo_frames(env, runtime, caplog):
    caplog.set_level(logging.INFO)
    runtime.pipeline = recorder = RecordingPipeline(runtime.pipeline)
    _batch_size(runtime, 4)
    batched = [env.submit(prompt=p, seed=30 + i) for i, p in enumerate(PROMPTS)]
    env.work()
    ids = [p.job_id for p in batched]
    assert _batches(caplog) == [ids]  # one batch, oldest first
    records = [env.record(job_id) for job_id in ids]
    assert [r.status for r in records] == [JobStatus.succeeded] * 4
    # Each ran under its own run token and reported its own progress.
    assert {r.run_token for r in records} == {f"{runtime.worker_id}:1"}
    assert all(r.step == r.total_steps == 2 and r.progress == 100 for r in records)
    # The claimed jobs never went through RQ: their entries went when they were claimed.
    assert [Job.exists(job_id, connection=env.r) for job_id in ids[1:]] == [False] * 3

    _batch_size(runtime, 1)
    solo = [env.submit(prompt=p, seed=30 + i) for i, p in enumerate(PROMPTS)]
    env.work()
    assert len(_batches(caplog)) == 1
    for batch_record, payload in zip(records, solo, strict=True):
        in_batch, alone = recorder.videos[(payload.input.prompt, payload.seed)]
        assert in_batch.shape == alone.shape == (8, 32, 48, 3)
        # The same video up to fp32 GEMM rounding between batch sizes: at most one level of 255, rarely.
        assert np.abs(in_batch - alone).max() <= 1 and np.mean(in_batch != alone) < 1e-3
        if (in_batch == alone).all():  # H.264 turns a one-level difference into larger ones; same input, same file
            assert (_frames(runtime, batch_record) == _frames(runtime, env.record(payload.job_id))).all()


@pytest.mark.parametrize("doomed_index", [0, 1], ids=["the RQ job", "a claimed job"])
def test_a_job_canceled_mid_batch_ends_canceled_at_once_while_the_others_succeed(env, runtime, caplog,
                                                                                 doomed_index):
    caplog.set_level(logging.INFO)
    _batch_size(runtime, 3)
    payloads = [env.submit(prompt=p, seed=i, num_inference_steps=100) for i, p in enumerate(PROMPTS[:3])]
    doomed = payloads[doomed_index]
    others = [p for p in payloads if p is not doomed]
    seen: dict[str, Any] = {}

    def client() -> None:
        r = Redis.from_url(env.settings.redis_url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = jobstore.get(r, doomed.job_id, prefix=env.prefix)
            if job is not None and job.status == JobStatus.running and (job.step or 0) >= 5:
                after, _ = jobstore.request_cancel(r, doomed.job_id, prefix=env.prefix)
                seen["step"] = after.step  # as the cancel was written
                while jobstore.get(r, doomed.job_id, prefix=env.prefix).status != JobStatus.canceled:
                    assert time.monotonic() < deadline, "the canceled job never ended"
                    time.sleep(0.002)
                seen["others_steps"] = [jobstore.get(r, p.job_id, prefix=env.prefix).step for p in others]
                return
            time.sleep(0.002)

    thread = threading.Thread(target=client)
    thread.start()
    env.work()
    thread.join()

    assert _batches(caplog) == [[p.job_id for p in payloads]]
    record = env.record(doomed.job_id)
    assert record.status == JobStatus.canceled and record.outputs is None
    assert record.step is not None and record.step <= seen["step"] + 1
    # It ended while its batch mates were still denoising, not when the batch finished.
    assert all(step < 100 for step in seen["others_steps"]), seen
    for payload in others:
        other = env.record(payload.job_id)
        assert other.status == JobStatus.succeeded and other.step == 100
    assert not [p for p in env.settings.storage_dir.rglob("*") if doomed.job_id in str(p) and p.is_file()]


def test_a_job_taken_over_mid_batch_drops_out_and_runs_again(env, runtime, caplog):
    """Its fence is refused (here: re-queued under its token, as the reaper does): the batch goes on without
    it, and the re-queued job runs again afterwards."""
    caplog.set_level(logging.INFO)
    _batch_size(runtime, 2)
    kept, taken = (env.submit(prompt=p, seed=i, num_inference_steps=100) for i, p in enumerate(PROMPTS[:2]))

    def reaper_like() -> None:
        r = Redis.from_url(env.settings.redis_url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = jobstore.get(r, taken.job_id, prefix=env.prefix)
            if job is not None and job.status == JobStatus.running and (job.step or 0) >= 5:
                queueing.requeue(r, taken.job_id, env.settings, token=job.run_token, actor="test")
                return
            time.sleep(0.002)

    thread = threading.Thread(target=reaper_like)
    thread.start()
    env.work()
    thread.join()
    superseded = [r for r in caplog.records if getattr(r, "event", None) == "job.superseded"]
    assert [r.job_id for r in superseded] == [taken.job_id]
    assert env.record(kept.job_id).status == JobStatus.succeeded
    again = env.record(taken.job_id)
    assert again.status == JobStatus.succeeded and again.attempts == 2
    assert again.run_token == f"{runtime.worker_id}:2"


def test_an_upload_failure_fails_only_its_own_job(env, make_runtime, tiny_pipeline):
    class OneJobsStorageFails(LocalStorage):
        doomed = ""

        def put_file(self, key, path, content_type):
            if self.doomed in key:
                raise StorageError("disk full")
            super().put_file(key, path, content_type)

    storage = OneJobsStorageFails(env.settings.storage_dir)
    runtime = make_runtime(tiny_pipeline, storage, upload_attempts=1)
    _batch_size(runtime, 3)
    payloads = [env.submit(prompt=p, seed=i) for i, p in enumerate(PROMPTS[:3])]
    storage.doomed = payloads[1].job_id
    from worker import jobs

    jobs.install(runtime)
    try:
        env.work()
    finally:
        jobs.install(None)
    statuses = [env.record(p.job_id).status for p in payloads]
    assert statuses == [JobStatus.succeeded, JobStatus.failed, JobStatus.succeeded]
    assert env.record(payloads[1].job_id).error.code == "storage_error"


def test_incompatible_jobs_are_not_batched(env, runtime, caplog):
    caplog.set_level(logging.INFO)
    _batch_size(runtime, 4)
    payloads = [env.submit(), env.submit(num_inference_steps=3), env.submit(height=64), env.submit(sampler="iddpm"),
                env.submit(guidance_scale=3.0), env.submit(model="bora")]
    env.work()
    assert _batches(caplog) == []
    records = [env.record(p.job_id) for p in payloads]
    assert [r.status for r in records[:5]] == [JobStatus.succeeded] * 5
    assert records[5].status == JobStatus.failed and records[5].error.code == "invalid_input"  # not served here
    for before, after in zip(records[:5], records[1:5], strict=False):
        assert after.started_at >= before.completed_at  # one at a time


def test_claims_are_exclusive_and_take_the_queue_entry(env):
    first, *rest = [env.submit(prompt=p, seed=i) for i, p in enumerate(PROMPTS)]
    one = queueing.claim_batch(env.r, env.settings, first, 2)
    two = queueing.claim_batch(env.r, env.settings, first, 5)
    assert [p.job_id for p in one] == [p.job_id for p in rest[:2]]
    assert [p.job_id for p in two] == [rest[2].job_id]
    queue = [i.decode() for i in env.r.lrange(jobstore.Keys(env.prefix).rq_queue, 0, -1)]
    assert queue == [first.job_id]  # the first job's entry is RQ's to take
    assert one[0].input == rest[0].input and one[0].seed == rest[0].seed
