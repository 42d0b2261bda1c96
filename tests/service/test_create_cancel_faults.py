"""Create and cancel under Redis faults and races (issue failures 6 and 7), against the real Redis through a
fault-injecting proxy (tests/faults/proxy.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from rq.job import Job

from service.api.app import create_app
from service.jobs import jobstore, webhooks
from service.jobs.logs import JsonFormatter
from service.jobs.schemas import JobStatus
from tests.faults.proxy import FaultProxy
from tests.service.conftest import bearer


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    fault = FaultProxy(6379)
    yield fault
    fault.close()


def test_an_ambiguous_create_makes_one_job_and_one_queue_entry(settings, api_key, redis_conn, proxy):
    """Failure 6, a lost reply on the wire: the script that stores the job and its RQ entry ran, but the
    connection dropped before its reply. Neither a second RQ entry nor, for the client's retry, a second job."""
    via_proxy = settings.model_copy(update={"redis_url": proxy.url.replace("/0", "/11")})
    redis_conn.script_load(jobstore._CREATE_LUA)  # so the EVALSHA that loses its reply is the one that creates
    proxy.drop_after(b"EVALSHA", 1)
    with TestClient(create_app(via_proxy), raise_server_exceptions=False, headers=bearer(api_key)) as client:
        first = client.post("/v1/videos", json={"prompt": "a heart"}, headers={"Idempotency-Key": "once"})
        again = client.post("/v1/videos", json={"prompt": "a heart"}, headers={"Idempotency-Key": "once"})
    assert proxy.stats["dropped_after_forward"] == 1
    assert first.status_code in (202, 503), first.text
    assert again.status_code == 202
    assert redis_conn.zcard(jobstore.Keys(settings.key_prefix).jobs) == 1
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [again.json()["id"]]


def test_a_create_whose_commit_was_not_confirmed_is_not_made_twice(client, settings, redis_conn, monkeypatch):
    """Failure 6: the create's script ran but the API saw an error; it used to release the Idempotency-Key, so
    the client's retry made a second job. The claim is written by the same script as the job."""
    real, lost = AsyncRedis.evalsha, []
    create_sha = hashlib.sha1(jobstore._CREATE_LUA.encode()).hexdigest()

    async def committed_then_lost(self, sha, numkeys, *keys_and_args):
        result = await real(self, sha, numkeys, *keys_and_args)
        if sha == create_sha and not lost:
            lost.append(True)
            raise RedisConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(AsyncRedis, "evalsha", committed_then_lost)
    first = client.post("/v1/videos", json={"prompt": "a heart"}, headers={"Idempotency-Key": "k"})
    again = client.post("/v1/videos", json={"prompt": "a heart"}, headers={"Idempotency-Key": "k"})
    assert lost and first.status_code == 503 and again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert redis_conn.zcard(jobstore.Keys(settings.key_prefix).jobs) == 1
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [again.json()["id"]]


@pytest.fixture
def hooked(settings):
    return settings.model_copy(update={
        "webhook_allowed_hosts": "hooks.example.org", "webhook_secret": "whsec_" + "A" * 43,
    })


def test_cancel_never_500s_and_is_audited_and_notified_once(hooked, api_key, redis_conn, monkeypatch, caplog):
    """Failure 7: RQ's own job deletion raised ("Execution ... not found") when a worker had just taken the
    job: the cancel answered 500, and its audit line and webhook were never written. The cancel no longer
    goes through RQ's job objects; a retried cancel answers the same and writes nothing twice."""
    caplog.set_level(logging.INFO, logger="bora.audit")

    def execution_not_found(self, *args, **kwargs):
        raise ValueError(f"Execution {self.id} not found")

    monkeypatch.setattr(Job, "delete", execution_not_found)
    with TestClient(create_app(hooked), raise_server_exceptions=False, headers=bearer(api_key)) as client:
        job = client.post("/v1/videos", json={"prompt": "a heart",
                                              "webhook": {"url": "https://hooks.example.org/x"}}).json()
        answers = [client.post(f"/v1/videos/{job['id']}/cancel") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
    assert {a.json()["status"] for a in answers} == {JobStatus.canceled}
    assert Queue(hooked.queue_name, connection=redis_conn).job_ids == []
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "bora.audit"]
    assert [line["event"] for line in lines if line["job_id"] == job["id"]] == ["job.created", "job.canceled"]
    sent = Queue(webhooks.queue_name(hooked.key_prefix), connection=redis_conn).jobs
    assert [(j.kwargs["job_id"], j.kwargs["event"]) for j in sent] == [(job["id"], "video.canceled")]
