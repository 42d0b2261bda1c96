"""Service test fixtures: real Redis (DB 11, a unique key prefix per test, cleaned up), the app, storage.

Auth is on, as in production: `api_key` is a key for tenant `TENANT` in the test's own key file, and `client`
sends it on every request. Other tenants come from `key_for(settings, tenant)`.

Every key a test creates carries its prefix or one of its job ids, and is deleted afterwards, so tests never
touch other users of the DB (other suites use other DB indexes too).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.api.app import create_app
from service.jobs import heartbeats, jobstore
from service.jobs.config import Settings
from service.jobs.schemas import (
    ImageOutput,
    JobRecord,
    JobStatus,
    Outputs,
    Stage,
    Timings,
    VideoInput,
    VideoOutput,
    WorkerHeartbeat,
    WorkerState,
    content_url,
    utcnow,
)
from service.jobs.storage import LocalStorage, output_key
from service.keys import create_key
from tests.support import free_port, moto_s3, require_redis, stop_processes, wait_http

REDIS_URL = "redis://127.0.0.1:6379/11"
TENANT = "tenant-a"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cleanup(r: Redis, prefix: str) -> None:
    keys = jobstore.Keys(prefix)
    ids = [m.decode() for m in r.zrange(keys.jobs, 0, -1)]
    doomed = list(r.scan_iter(f"{prefix}:*", count=1000)) + list(r.scan_iter(f"rq:*{keys.queue_name}*", count=1000))
    for job_id in ids:
        doomed += list(r.scan_iter(f"rq:*{job_id}*", count=1000))
    if doomed:
        r.delete(*doomed)
    r.srem("rq:queues", keys.rq_queue)


@pytest.fixture
def redis_conn() -> Redis:
    return require_redis(REDIS_URL)


@pytest.fixture
def prefix(redis_conn: Redis) -> Iterator[str]:
    value = "bora-test-" + secrets.token_hex(4)
    yield value
    cleanup(redis_conn, value)


@pytest.fixture
def settings(prefix: str, tmp_path: Path) -> Settings:
    # A roomy submission burst: tests that are not about admission control should not meet it.
    return Settings(
        redis_url=REDIS_URL, key_prefix=prefix, data_dir=tmp_path / "data", storage="local", rate_limit_burst=1000
    )


def key_for(settings: Settings, tenant: str) -> str:
    """A new API key for `tenant` in the settings' key file (the API picks it up without a restart)."""
    return create_key(settings.api_keys_file, tenant)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def api_key(settings: Settings) -> str:
    return key_for(settings, TENANT)


@pytest.fixture
def client(settings: Settings, api_key: str) -> Iterator[TestClient]:
    """The app with auth on, sending `TENANT`'s key on every request."""
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=bearer(api_key)) as c:
        yield c


def queued_record(job_id: str | None = None, *, tenant: str | None = TENANT, **input_overrides) -> JobRecord:
    params = dict(
        prompt="a beating heart", num_frames=16, height=64, width=64, fps=8, num_inference_steps=10,
        guidance_scale=7.0, sampler="iddpm", seed=7,
    )
    params.update(input_overrides)
    now = utcnow()
    return JobRecord(
        id=job_id or jobstore.new_job_id(), status=JobStatus.queued, stage=Stage.queued, created_at=now,
        updated_at=now, model="tiny", input=VideoInput(**params), seed=params["seed"], tenant=tenant,
    )


def finish_like_worker(r: Redis, settings: Settings, job_id: str, video: bytes, thumb: bytes = b"") -> JobRecord:
    """Drive a job to succeeded exactly as the worker does: running, outputs written, then succeeded."""
    storage = LocalStorage(settings.storage_dir)
    token = jobstore.mark_running(r, job_id, "test-worker", prefix=settings.key_prefix, weights_sha256="ab" * 32).token
    jobstore.update_progress(r, job_id, Stage.denoising, 10, 10, 90.0, prefix=settings.key_prefix, token=token)
    storage.put_bytes(output_key(job_id, "video.mp4", 1), video, "video/mp4")
    thumbnail = None
    if thumb:
        storage.put_bytes(output_key(job_id, "thumbnail.jpg", 1), thumb, "image/jpeg")
        thumbnail = ImageOutput(
            url=content_url(job_id, "thumbnail"), key=output_key(job_id, "thumbnail.jpg", 1), bytes=len(thumb),
            content_type="image/jpeg", width=64, height=64,
        )
    outputs = Outputs(
        video=VideoOutput(
            url=content_url(job_id), key=output_key(job_id, "video.mp4", 1), bytes=len(video), content_type="video/mp4",
            sha256="00" * 32, width=64, height=64, frames=16, fps=8, duration_s=2.0,
        ),
        thumbnail=thumbnail,
    )
    return jobstore.mark_succeeded(r, job_id, outputs, Timings(total_s=1.5), prefix=settings.key_prefix, token=token)


def beat(r: Redis, prefix: str, state: WorkerState = WorkerState.ready, worker_id: str = "w-test", ttl: int = 30):
    """Publish a heartbeat exactly as the worker does."""
    heartbeats.publish(
        r, WorkerHeartbeat(worker_id=worker_id, state=state, model="tiny", device="cpu", dtype="float32", pid=1),
        prefix=prefix, ttl_seconds=ttl,
    )


def bora_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env.update(
        BORA_REDIS_URL=settings.redis_url or REDIS_URL, BORA_KEY_PREFIX=settings.key_prefix,
        BORA_DATA_DIR=str(settings.data_dir), BORA_STORAGE=settings.storage,
        BORA_AUTH=settings.auth, BORA_API_KEYS_FILE=str(settings.api_keys_file),
        BORA_RATE_LIMIT_PER_SECOND=str(settings.rate_limit_per_second),
        BORA_RATE_LIMIT_BURST=str(settings.rate_limit_burst),
        BORA_MAX_QUEUED_PER_TENANT=str(settings.max_queued_per_tenant),
        BORA_MAX_QUEUED_TOTAL=str(settings.max_queued_total),
    )
    env.update(extra)
    return env


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    """The real thing: `uvicorn service.main:app` in a subprocess on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO_ROOT, env=bora_env(settings),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", process, 30, "uvicorn")
        yield base
    finally:
        stop_processes([process], timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server over HTTP on a free loopback port."""
    yield from moto_s3()
