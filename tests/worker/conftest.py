"""Worker test fixtures: real Redis (its own DB index and key prefix), a resident tiny pipeline, a runtime.

Redis is the machine's 127.0.0.1:6379 (CI has it too); every key a test makes carries its unique prefix or
one of its job ids, and is deleted afterwards, so tests never touch other users of the DB.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue, SimpleWorker

from service.jobs import jobstore, queueing
from service.jobs.config import Settings
from service.jobs.schemas import JobPayload, JobRecord, JobStatus, Stage, VideoInput, utcnow
from service.jobs.storage import LocalStorage, Storage
from tests.support import require_redis
from worker import jobs
from worker.metrics import WorkerMetrics

REDIS_URL = "redis://127.0.0.1:6379/12"
WORKER_FUNCTION = "worker.jobs.run_video_job"


@pytest.fixture
def redis_conn() -> Redis:
    return require_redis(REDIS_URL)


class Env:
    """A test's Redis namespace: prefix, settings, queue, and helpers to submit and run jobs."""

    def __init__(self, r: Redis, prefix: str, storage_dir: Path) -> None:
        self.r = r
        self.prefix = prefix
        self.settings = Settings(
            redis_url=REDIS_URL,
            key_prefix=prefix,
            storage_dir=storage_dir,
            data_dir=storage_dir.parent,
            worker_metrics_port=0,
            job_timeout_seconds=600,
        )
        self.queue = Queue(self.settings.queue_name, connection=r)
        self.job_ids: list[str] = []

    def record(self, job_id: str) -> JobRecord:
        record = jobstore.get(self.r, job_id, prefix=self.prefix)
        assert record is not None
        return record

    def submit(self, model: str = "tiny", enqueue: bool = True, **overrides: Any) -> JobPayload:
        """Store a queued job and enqueue it the way the API does."""
        params: dict[str, Any] = dict(
            prompt="a beating heart, ultrasound",
            num_frames=8,
            height=32,
            width=48,
            fps=8,
            num_inference_steps=2,
            guidance_scale=7.0,
            sampler="ddim",
            seed=7,
        )
        params.update(overrides)
        job_id = jobstore.new_job_id()
        self.job_ids.append(job_id)
        now = utcnow()
        inp = VideoInput(**params)
        record = JobRecord(
            id=job_id,
            status=JobStatus.queued,
            stage=Stage.queued,
            created_at=now,
            updated_at=now,
            model=model,
            input=inp,
            seed=inp.seed,
            request_id=f"req-{job_id[-6:]}",
            tenant="t1",
        )
        payload = JobPayload(
            job_id=job_id,
            input=inp,
            seed=inp.seed,
            model=model,
            request_id=record.request_id,
            tenant="t1",
            enqueued_at=now,
        )
        # The API's path: the create script writes RQ's entry, so every job a worker test runs proves that a real
        # RQ worker takes what the script wrote.
        entry = queueing.rq_entry(self.queue, self.settings, payload) if enqueue else None
        jobstore.create(self.r, record, prefix=self.prefix, rq_entry=entry)
        return payload

    def enqueue(self, payload: dict[str, Any], job_id: str) -> None:
        self.queue.enqueue_call(WORKER_FUNCTION, args=(payload,), job_id=job_id, timeout=600)

    def work(self) -> None:
        SimpleWorker([self.queue], connection=self.r, name=f"{self.prefix}-w").work(burst=True)

    def run_one(self, runtime: jobs.Runtime, **overrides: Any) -> tuple[JobPayload, JobRecord]:
        """Submit one job and work the queue with `runtime` installed meanwhile: the payload and the record."""
        jobs.install(runtime)
        try:
            payload = self.submit(**overrides)
            self.work()
        finally:
            jobs.install(None)
        return payload, self.record(payload.job_id)

    def cleanup(self) -> None:
        keys: set[bytes] = set(self.r.scan_iter(match=f"*{self.prefix}*", count=1000))
        for job_id in self.job_ids:
            keys.update(self.r.scan_iter(match=f"*{job_id}*", count=1000))
        if keys:
            self.r.delete(*keys)
        self.r.srem("rq:workers", f"{self.prefix}-w")
        self.r.srem("rq:queues", f"rq:queue:{self.settings.queue_name}")


@pytest.fixture
def env(redis_conn: Redis, tmp_path: Path) -> Iterator[Env]:
    e = Env(redis_conn, "t" + secrets.token_hex(4), tmp_path / "videos")
    yield e
    e.cleanup()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir: Path) -> Any:
    from model.pipeline import BoraPipeline

    return BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture
def runtime(env: Env, tiny_pipeline: Any) -> Iterator[jobs.Runtime]:
    """The resident-pipeline runtime `run_video_job` uses, installed for this test only."""
    rt = _runtime(env, tiny_pipeline, LocalStorage(env.settings.storage_dir))
    jobs.install(rt)
    yield rt
    jobs.install(None)


@pytest.fixture
def make_runtime(env: Env) -> Any:
    """Build a runtime around any pipeline/storage (failure fixtures wrap the real ones)."""
    return lambda pipeline, storage, **kwargs: _runtime(env, pipeline, storage, **kwargs)


def _runtime(env: Env, pipeline: Any, storage: Storage, **kwargs: Any) -> jobs.Runtime:
    return jobs.Runtime(
        pipeline=pipeline,
        redis=env.r,
        settings=env.settings,
        storage=storage,
        metrics=WorkerMetrics(),
        worker_id=f"{env.prefix}-w",
        upload_backoff_s=0.01,
        **kwargs,
    )
