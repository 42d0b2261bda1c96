"""BORA_STORE_PROMPT=false through the API and the job store on real Redis: the prompt is kept while the job
may still run and replaced by its sha256 by whichever transition ends the job; webhooks never carry it.
(tests/e2e/test_prompt_privacy.py checks the sidecar, MP4 tags, logs and every Redis key on a whole stack.)"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from service.api.app import create_app
from service.jobs import jobstore, webhooks
from service.jobs.config import Settings
from tests.service.conftest import REDIS_URL, finish_like_worker

PROMPT = "patient 0042: aortic valve, parasternal long axis"
DIGEST = hashlib.sha256(PROMPT.encode()).hexdigest()
HOOK = {"url": "https://hooks.example.org/bora", "events": ["video.started", "video.succeeded", "video.canceled"]}


@pytest.fixture
def private_settings(prefix, tmp_path) -> Settings:
    return Settings(
        redis_url=REDIS_URL, key_prefix=prefix, data_dir=tmp_path / "data", auth="disabled", rate_limit_per_second=0,
        store_prompt=False, webhook_allowed_hosts="hooks.example.org", webhook_secret="master-secret",
    )


@pytest.fixture
def private_client(private_settings) -> Iterator[TestClient]:
    with TestClient(create_app(private_settings), raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


def _webhook_bodies(redis_conn, settings: Settings) -> list[str]:
    return [task.kwargs["payload"] for task in Queue(webhooks.queue_name(settings.key_prefix), connection=redis_conn).jobs]


def test_the_prompt_is_kept_until_the_job_ends_then_only_its_hash(private_client, redis_conn, private_settings):
    prefix = private_settings.key_prefix
    job = private_client.post("/v1/videos", json={"prompt": PROMPT, "webhook": HOOK}).json()
    assert job["input"]["prompt"] == PROMPT and job["input"]["prompt_sha256"] == DIGEST  # the worker needs it

    run = jobstore.mark_running(redis_conn, job["id"], "w1", prefix=prefix)
    webhooks.enqueue_event(redis_conn, run.record, "video.started", prefix=prefix)  # as the worker's start does
    assert jobstore.get(redis_conn, job["id"], prefix=prefix).input.prompt == PROMPT
    ended = jobstore.mark_failed(redis_conn, job["id"], "internal", "boom", prefix=prefix, token=run.token,
                                 actor=run.token)
    assert ended.input.prompt is None and ended.input.prompt_sha256 == DIGEST
    shown = private_client.get(f"/v1/videos/{job['id']}").json()["input"]
    assert shown["prompt"] is None and shown["prompt_sha256"] == DIGEST
    assert PROMPT.encode() not in b"".join(redis_conn.hgetall(jobstore.Keys(prefix).job(job["id"])).values())
    bodies = _webhook_bodies(redis_conn, private_settings)
    assert bodies and all(PROMPT not in body and DIGEST in body for body in bodies)


def test_succeeded_and_canceled_jobs_keep_only_the_hash(private_client, redis_conn, private_settings):
    done = private_client.post("/v1/videos", json={"prompt": PROMPT}).json()
    assert finish_like_worker(redis_conn, private_settings, done["id"], b"mp4").input.prompt is None
    queued = private_client.post("/v1/videos", json={"prompt": PROMPT, "webhook": HOOK}).json()
    assert private_client.post(f"/v1/videos/{queued['id']}/cancel").json()["input"]["prompt"] is None
    for job_id in (done["id"], queued["id"]):
        assert private_client.get(f"/v1/videos/{job_id}").json()["input"]["prompt_sha256"] == DIGEST
    assert all(PROMPT not in body for body in _webhook_bodies(redis_conn, private_settings))


def test_the_default_keeps_the_prompt(client, redis_conn, settings):
    job = client.post("/v1/videos", json={"prompt": PROMPT}).json()
    assert finish_like_worker(redis_conn, settings, job["id"], b"mp4").input.prompt == PROMPT
    assert client.get(f"/v1/videos/{job['id']}").json()["input"]["prompt"] == PROMPT
