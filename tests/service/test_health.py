"""/healthz, /readyz (Redis + a worker heartbeat written exactly as the worker writes it), /metrics."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from service.jobs import heartbeats
from service.jobs.schemas import WorkerState
from tests.service.conftest import beat, finish_like_worker


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_ready_worker(client, redis_conn, settings):
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready" and "no worker ready" in body["error"]["message"]
    assert body["redis"] == "ok" and set(body["workers_by_state"].values()) == {0}

    beat(redis_conn, settings.key_prefix, WorkerState.loading)
    response = client.get("/readyz")
    assert response.status_code == 503 and "workers: 1 loading" in response.json()["error"]["message"]

    beat(redis_conn, settings.key_prefix, WorkerState.ready)
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["workers_ready"] == 1 and response.json()["workers_by_state"]["ready"] == 1
    # open to anyone: counts only, nothing about the workers themselves or the jobs they run
    assert set(response.json()) == {"status", "redis", "workers_ready", "workers_by_state"}
    for private in ["w-test", "tiny", "pid", "hostname", "current_job", "weights_sha256"]:
        assert private not in response.text, private

    beat(redis_conn, settings.key_prefix, WorkerState.busy)
    assert client.get("/readyz").status_code == 200
    beat(redis_conn, settings.key_prefix, WorkerState.stopping)
    assert client.get("/readyz").status_code == 503


def test_readyz_forgets_a_worker_whose_heartbeat_expired(client, redis_conn, settings):
    beat(redis_conn, settings.key_prefix, WorkerState.ready, ttl=1)
    assert client.get("/readyz").status_code == 200
    time.sleep(1.2)
    assert client.get("/readyz").status_code == 503
    assert heartbeats.list_workers(redis_conn, prefix=settings.key_prefix) == []
    assert not redis_conn.smembers(f"{settings.key_prefix}:workers")


def metric_samples(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_names_and_values(client, redis_conn, settings):
    for _ in range(2):
        client.post("/v1/videos", json={"prompt": "p"})
    job_id = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    client.get(f"/v1/videos/{job_id}")
    client.get("/v1/videos/vid_unknown")
    beat(redis_conn, settings.key_prefix, WorkerState.ready)
    client.post(f"/v1/videos/{job_id}/cancel")
    done = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    from rq import Queue

    Queue(settings.queue_name, connection=redis_conn).remove(done)
    finish_like_worker(redis_conn, settings, done, b"mp4")

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = metric_samples(response.text)
    for name in ("bora_http_requests", "bora_http_request_duration_seconds", "bora_jobs_submitted",
                 "bora_queue_depth", "bora_workers_ready", "bora_jobs_finished"):
        assert name in families, name
    text = response.text
    assert 'bora_http_requests_total{code="202",method="POST",route="/v1/videos"} 4.0' in text
    assert 'bora_http_requests_total{code="404",method="GET",route="/v1/videos/{job_id}"} 1.0' in text
    assert 'bora_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/videos/{job_id}"}' in text
    assert 'bora_jobs_submitted_total{model="tiny"} 4.0' in text
    assert "bora_queue_depth 2.0" in text
    assert "bora_workers_ready 1.0" in text
    assert 'bora_jobs_finished_total{code="canceled",status="canceled"} 1.0' in text
    assert 'bora_jobs_finished_total{code="",status="succeeded"} 1.0' in text
    assert "_created" not in text
    # An unmatched path does not become its own label value.
    client.get("/no/such/path/123")
    assert 'route="unmatched"' in client.get("/metrics").text
