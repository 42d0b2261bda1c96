"""Submissions under load and retries: Idempotency-Key, the per-tenant rate limit, the per-tenant and global
queue caps (429 + Retry-After), the body cap (413), and accepting jobs while no worker is ready."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from service.api.app import create_app
from service.jobs import idempotency, jobstore
from service.jobs.config import Settings
from tests.service.conftest import TENANT, bearer, key_for

ERROR_FIELDS = {"type", "code", "message", "param"}


def app_client(settings: Settings, api_key: str, **overrides) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides)), raise_server_exceptions=False,
                      headers=bearer(api_key))


def assert_429(response, code: str) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["type"] == "rate_limit_error" and error["code"] == code
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


# --- Idempotency-Key ---------------------------------------------------------------------------------------


def test_same_key_same_body_returns_the_original_job(client, redis_conn, settings):
    body = {"prompt": "a beating heart", "num_frames": 8}
    first = client.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    job_id = first.json()["id"]
    # Same body (keys in another order), on either create route: the same job, 202, marked as a replay.
    for path in ["/v1/videos", "/generate"]:
        again = client.post(path, json={"num_frames": 8, "prompt": "a beating heart"},
                            headers={"Idempotency-Key": "order-1"})
        assert again.status_code == 202 and again.json()["id"] == job_id
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == f"/v1/videos/{job_id}"
        assert again.json()["seed"] == first.json()["seed"]  # the drawn seed too: it is the same job
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [job_id]
    assert [j["id"] for j in client.get("/v1/videos").json()["data"]] == [job_id]
    # The replay answers with the job as it is now.
    jobstore.mark_running(redis_conn, job_id, "w", prefix=settings.key_prefix)
    assert client.post("/v1/videos", json=body, headers={"Idempotency-Key": "order-1"}).json()["status"] == "running"
    # Kept 24 h.
    ttl = redis_conn.ttl(f"{settings.key_prefix}:idem:{TENANT}:order-1")
    assert idempotency.TTL_SECONDS - 60 < ttl <= idempotency.TTL_SECONDS


def test_same_key_other_body_is_409(client):
    assert client.post("/v1/videos", json={"prompt": "a"}, headers={"Idempotency-Key": "k"}).status_code == 202
    response = client.post("/v1/videos", json={"prompt": "b"}, headers={"Idempotency-Key": "k"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["code"] == "idempotency_key_reused" and error["param"] == "header.Idempotency-Key"
    assert len(client.get("/v1/videos").json()["data"]) == 1


def test_keys_are_per_tenant(client, settings):
    first = client.post("/v1/videos", json={"prompt": "a"}, headers={"Idempotency-Key": "shared"}).json()["id"]
    other = bearer(key_for(settings, "hospital-b"))
    theirs = client.post("/v1/videos", json={"prompt": "a"}, headers={"Idempotency-Key": "shared", **other})
    assert theirs.status_code == 202 and theirs.json()["id"] != first
    assert "idempotent-replayed" not in theirs.headers


def test_concurrent_retries_create_one_job(client, redis_conn, settings):
    def post(_: int):
        return client.post("/v1/videos", json={"prompt": "race"}, headers={"Idempotency-Key": "race-1"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(16)))
    created = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(created) == 1
    # The claim is written with the job: every concurrent request gets that one job back, none a 409 or 5xx.
    assert {r.status_code for r in responses} == {202}
    assert Queue(settings.queue_name, connection=redis_conn).count == 1


def test_bad_keys_are_422_and_a_key_naming_no_job_is_free(client, redis_conn, settings):
    for bad in ["", "x" * 256, "a b"]:
        response = client.post("/v1/videos", json={"prompt": "p"}, headers={"Idempotency-Key": bad})
        assert response.status_code == 422, bad
        assert response.json()["error"]["param"] == "header.Idempotency-Key"
    # A key whose job is gone (expired with its retention): a new job, and the key names it from then on.
    rkey = f"{settings.key_prefix}:idem:{TENANT}:gone"
    fingerprint = idempotency.body_sha256({"prompt": "p"})
    redis_conn.set(rkey, json.dumps({"body_sha256": fingerprint, "job_id": "vid_" + "0" * 32}), ex=60)
    response = client.post("/v1/videos", json={"prompt": "p"}, headers={"Idempotency-Key": "gone"})
    assert response.status_code == 202 and response.json()["id"] != "vid_" + "0" * 32
    again = client.post("/v1/videos", json={"prompt": "p"}, headers={"Idempotency-Key": "gone"})
    assert again.json()["id"] == response.json()["id"] and again.headers["idempotent-replayed"] == "true"


def test_a_refused_submission_frees_its_idempotency_key(settings, api_key, redis_conn):
    with app_client(settings, api_key, max_queued_per_tenant=1) as client:
        assert client.post("/v1/videos", json={"prompt": "a"}).status_code == 202
        refused = client.post("/v1/videos", json={"prompt": "b"}, headers={"Idempotency-Key": "later"})
        assert_429(refused, "tenant_queue_full")
        assert redis_conn.get(f"{settings.key_prefix}:idem:{TENANT}:later") is None
        # A replay of an accepted job is answered even when the queue is full: it creates nothing.
        job = client.get("/v1/videos").json()["data"][0]
        redis_conn.delete(f"{settings.key_prefix}:idem:{TENANT}:again")
        Queue(settings.queue_name, connection=redis_conn).empty()
        jobstore.request_cancel(redis_conn, job["id"], prefix=settings.key_prefix)
        first = client.post("/v1/videos", json={"prompt": "c"}, headers={"Idempotency-Key": "again"})
        assert first.status_code == 202
        replay = client.post("/v1/videos", json={"prompt": "c"}, headers={"Idempotency-Key": "again"})
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]


# --- admission control -------------------------------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after_per_tenant(settings, api_key):
    with app_client(settings, api_key, rate_limit_per_second=0.5, rate_limit_burst=3) as client:
        codes = [client.post("/generate", json={"prompt": f"p{i}"}).status_code for i in range(3)]
        assert codes == [202, 202, 202]
        refused = client.post("/v1/videos", json={"prompt": "p"})
        assert 1 <= assert_429(refused, "rate_limited") <= 2
        assert "0.5 submissions/s" in refused.json()["error"]["message"]
        # Another tenant has its own bucket; reads are never rate limited.
        other = bearer(key_for(settings, "hospital-b"))
        assert client.post("/v1/videos", json={"prompt": "p"}, headers=other).status_code == 202
        assert all(client.get("/v1/videos").status_code == 200 for _ in range(10))


def test_tenant_queue_cap(settings, api_key, redis_conn):
    with app_client(settings, api_key, max_queued_per_tenant=3) as client:
        ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(3)]
        refused = client.post("/v1/videos", json={"prompt": "p"})
        assert assert_429(refused, "tenant_queue_full") == settings.queue_full_retry_after_seconds
        assert "3 jobs queued" in refused.json()["error"]["message"]
        other = bearer(key_for(settings, "hospital-b"))
        assert client.post("/v1/videos", json={"prompt": "p"}, headers=other).status_code == 202
        # A job that starts running leaves the queue, and so does a canceled one: room for two more.
        Queue(settings.queue_name, connection=redis_conn).remove(ids[0])
        token = jobstore.mark_running(redis_conn, ids[0], "w", prefix=settings.key_prefix).token
        assert client.post(f"/v1/videos/{ids[1]}/cancel").json()["status"] == "canceled"
        assert client.post("/v1/videos", json={"prompt": "q"}).status_code == 202
        assert client.post("/v1/videos", json={"prompt": "r"}).status_code == 202
        assert_429(client.post("/v1/videos", json={"prompt": "s"}), "tenant_queue_full")
        # A running job put back in the queue (worker lost) counts again.
        jobstore.mark_requeued(redis_conn, ids[0], prefix=settings.key_prefix, token=token, actor="test")
        jobstore.request_cancel(redis_conn, ids[2], prefix=settings.key_prefix)
        assert_429(client.post("/v1/videos", json={"prompt": "t"}), "tenant_queue_full")


def test_global_queue_cap(settings, api_key):
    with app_client(settings, api_key, max_queued_total=4) as client:
        tenants = [bearer(api_key)] + [bearer(key_for(settings, f"t{i}")) for i in range(3)]
        assert [client.post("/v1/videos", json={"prompt": "p"}, headers=h).status_code for h in tenants] == [202] * 4
        for headers in tenants:
            refused = client.post("/v1/videos", json={"prompt": "p"}, headers=headers)
            assert_429(refused, "queue_full")
            assert "4 jobs waiting" in refused.json()["error"]["message"]


def test_no_caps_when_set_to_zero(settings, api_key):
    with app_client(settings, api_key, max_queued_total=0, max_queued_per_tenant=0, rate_limit_per_second=0,
                    rate_limit_burst=1) as client:
        assert all(client.post("/v1/videos", json={"prompt": "p"}).status_code == 202 for _ in range(5))


@pytest.mark.parametrize("path", ["/v1/videos", "/generate"])
def test_body_over_the_cap_is_413_json(client, settings, path):
    body = {"prompt": "x", "metadata": {"a": "b" * settings.max_body_bytes}}
    response = client.post(path, json=body)
    assert response.status_code == 413
    assert set(response.json()["error"]) == ERROR_FIELDS
    assert response.json()["error"]["code"] == "payload_too_large"


def test_jobs_are_accepted_while_no_worker_is_ready_and_readyz_says_so(client):
    ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready" and body["workers_ready"] == 0 and body["redis"] == "ok"
    assert "jobs are accepted and wait in the queue" in body["error"]["message"]
    response = client.post("/v1/videos", json={"prompt": "p"})
    assert response.status_code == 202 and response.json()["queue_position"] == 1
