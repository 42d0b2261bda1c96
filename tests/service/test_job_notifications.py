"""The API side of webhooks, live events and the audit trail (TestClient; real Redis). The delivery itself,
the worker's events and SSE over real uvicorn are proven in tests/e2e/test_job_events.py."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from service.api.app import create_app
from service.jobs import jobstore, webhooks
from service.jobs.config import Settings
from service.jobs.errors import InvalidTransition
from service.jobs.logs import JsonFormatter
from service.jobs.schemas import JobStatus, Stage
from tests.service.conftest import REDIS_URL, queued_record

HOOK = {"url": "https://hooks.example.org/bora"}


@pytest.fixture
def hooks_settings(prefix, tmp_path) -> Settings:
    return Settings(
        redis_url=REDIS_URL, key_prefix=prefix, data_dir=tmp_path / "data", auth="disabled",
        rate_limit_per_second=0, webhook_allowed_hosts="hooks.example.org, *.partner.example",
        webhook_secret="master-secret",
    )


@pytest.fixture
def hooks_client(hooks_settings) -> Iterator[TestClient]:
    with TestClient(create_app(hooks_settings), raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture
def plain_client(prefix, tmp_path) -> Iterator[TestClient]:
    settings = Settings(redis_url=REDIS_URL, key_prefix=prefix, data_dir=tmp_path / "data", auth="disabled",
                        rate_limit_per_second=0)
    with TestClient(create_app(settings), raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


def test_webhooks_are_refused_while_the_allowlist_is_empty(plain_client):
    response = plain_client.post("/v1/videos", json={"prompt": "a heart", "webhook": HOOK})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "webhook_not_allowed" and error["param"] == "body.webhook.url"
    assert "allowlist" in error["message"] and "BORA_WEBHOOK_ALLOWED_HOSTS" in error["message"]
    assert plain_client.get("/v1/webhook-secret").status_code == 404


@pytest.mark.parametrize("url", [
    "https://evil.example/x",                    # not listed
    "http://hooks.example.org/x",                # not https
    "https://user:pw@hooks.example.org/x",       # credentials
    "https://partner.example/x",                 # *.suffix is subdomains only
    "http://127.0.0.1:9/x",                      # loopback http only when explicitly allowed
    "https://169.254.169.254/latest/meta-data",  # the metadata service
    "https://hooks.example.org:6379/",           # an allowed host on another port (Redis here)
    "https://hooks.exa\tmple.org/x",             # parsers disagree on whitespace: refused, never stored
    "https://hooks.example.org/\nx",
    " https://hooks.example.org/x",
])
def test_destinations_outside_the_allowlist_are_422(hooks_client, url):
    response = hooks_client.post("/v1/videos", json={"prompt": "a heart", "webhook": {"url": url}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "webhook_not_allowed"


def test_the_url_is_stored_as_the_sender_parses_it(hooks_client):
    body = {"prompt": "a heart", "webhook": {"url": "HTTPS://Hooks.Example.ORG:443/bora?x=1"}}
    response = hooks_client.post("/v1/videos", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["webhook"]["url"] == "https://hooks.example.org:443/bora?x=1"


def test_bad_event_names_are_422(hooks_client):
    body = {"prompt": "a heart", "webhook": {**HOOK, "events": ["video.exploded"]}}
    assert hooks_client.post("/v1/videos", json=body).status_code == 422
    assert hooks_client.post("/v1/videos", json={"prompt": "a", "webhook": {**HOOK, "events": []}}).status_code == 422


def test_webhook_is_stored_and_shown_with_default_events(hooks_client, redis_conn, hooks_settings):
    job = hooks_client.post("/v1/videos", json={"prompt": "a heart", "webhook": HOOK}).json()
    assert job["webhook"] == {"url": HOOK["url"], "events": ["video.started", "video.succeeded", "video.failed",
                                                             "video.canceled"]}
    sub = {"url": "https://a.partner.example/h", "events": ["video.progress", "video.progress", "video.failed"]}
    other = hooks_client.post("/v1/videos", json={"prompt": "a heart", "webhook": sub}).json()
    assert other["webhook"]["events"] == ["video.progress", "video.failed"]
    record = jobstore.get(redis_conn, job["id"], prefix=hooks_settings.key_prefix)
    assert record.webhook is not None and record.webhook.url == HOOK["url"]
    assert hooks_client.get(f"/v1/videos/{job['id']}/webhook-attempts").json() == {"object": "list", "data": []}


def test_the_tenant_secret_is_served_and_matches_the_signer(hooks_client):
    body = hooks_client.get("/v1/webhook-secret").json()
    assert body["tenant"] == "default"
    assert body["secret"] == webhooks.tenant_webhook_secret("master-secret", "default")


def test_cancel_while_queued_queues_the_canceled_webhook(hooks_client, redis_conn, hooks_settings):
    job = hooks_client.post("/v1/videos", json={"prompt": "a heart", "webhook": HOOK}).json()
    assert hooks_client.post(f"/v1/videos/{job['id']}/cancel").json()["status"] == "canceled"
    queue = Queue(webhooks.queue_name(hooks_settings.key_prefix), connection=redis_conn)
    (task,) = queue.get_jobs()
    assert task.func_name == webhooks.SEND_FUNCTION
    kwargs = task.kwargs
    assert kwargs["event"] == "video.canceled" and kwargs["url"] == HOOK["url"] and kwargs["attempt"] == 1
    assert kwargs["tenant"] == "default" and "secret" not in json.dumps(kwargs)  # no secret in Redis
    assert json.loads(kwargs["payload"])["data"]["status"] == "canceled"


def test_job_routes_of_another_tenant_are_404(hooks_client, redis_conn, hooks_settings):
    theirs = queued_record(tenant="someone-else")
    jobstore.create(redis_conn, theirs, prefix=hooks_settings.key_prefix)
    webhooks.record_attempt(redis_conn, hooks_settings.key_prefix, theirs.id, {"attempt": 1})
    for path in (f"/v1/videos/{theirs.id}/events", f"/v1/videos/{theirs.id}/webhook-attempts"):
        response = hooks_client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found", path


def test_event_stream_of_a_finished_job_is_its_last_state_then_ends(hooks_client, redis_conn, hooks_settings):
    job = hooks_client.post("/v1/videos", json={"prompt": "a heart"}).json()
    assert job["version"] == 0
    hooks_client.post(f"/v1/videos/{job['id']}/cancel")
    with hooks_client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert text.startswith("retry: ") and text.count("event: job") == 1 and "id: 1\n" in text
    with hooks_client.stream("GET", f"/v1/videos/{job['id']}/events", headers={"Last-Event-ID": "1"}) as response:
        assert "event:" not in "".join(response.iter_text())


def test_every_transition_bumps_the_version(redis_conn, prefix):
    record = queued_record()
    jobstore.create(redis_conn, record, prefix=prefix)
    token = jobstore.mark_running(redis_conn, record.id, "w", prefix=prefix).token
    jobstore.update_progress(redis_conn, record.id, Stage.denoising, 1, 10, 10.0, prefix=prefix, token=token)
    jobstore.request_cancel(redis_conn, record.id, prefix=prefix)
    assert jobstore.get(redis_conn, record.id, prefix=prefix).version == 3
    jobstore.mark_canceled(redis_conn, record.id, prefix=prefix, token=token, actor=token)
    after = jobstore.get(redis_conn, record.id, prefix=prefix)
    assert after.status == JobStatus.canceled and after.version == 4
    # A refused transition changes nothing, version included.
    with pytest.raises(InvalidTransition):
        jobstore.update_progress(redis_conn, record.id, Stage.denoising, 2, 10, prefix=prefix, token=token)
    assert jobstore.get(redis_conn, record.id, prefix=prefix).version == 4


def test_api_writes_audit_lines_with_the_request_id(hooks_client, caplog):
    caplog.set_level(logging.INFO, logger="bora.audit")
    job = hooks_client.post("/v1/videos", json={"prompt": "an audited heart", "seed": 3},
                            headers={"X-Request-ID": "req-audit-1"}).json()
    hooks_client.post(f"/v1/videos/{job['id']}/cancel", headers={"X-Request-ID": "req-audit-2"})
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "bora.audit"]
    created, canceled = [line for line in lines if line["job_id"] == job["id"]]
    digest = hashlib.sha256(b"an audited heart").hexdigest()
    assert created["event"] == "job.created" and created["outcome"] == "queued"
    assert created["request_id"] == "req-audit-1" and created["prompt_sha256"] == digest
    assert created["tenant"] == "default" and created["params"]["seed"] == 3 and "prompt" not in created["params"]
    assert canceled["event"] == "job.canceled" and canceled["outcome"] == "canceled"
    assert canceled["request_id"] == "req-audit-2" and canceled["job_request_id"] == "req-audit-1"
    assert all("an audited heart" not in json.dumps(line) for line in lines)
