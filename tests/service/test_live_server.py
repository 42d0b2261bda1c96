"""The real thing over loopback: `uvicorn service.main:app` configured by BORA_* variables, httpx clients."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from rq import Queue

from service.jobs.schemas import WorkerState
from tests.service.conftest import bearer, beat, finish_like_worker


def test_submit_poll_download_over_http(live_server, redis_conn, settings, api_key):
    with httpx.Client(base_url=live_server, timeout=5, headers=bearer(api_key)) as client:
        def submit(i: int) -> httpx.Response:
            return client.post("/v1/videos", json={"prompt": f"cell {i}", "seed": i})

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(submit, range(16)))
        assert all(r.status_code == 202 for r in responses)
        ids = [r.json()["id"] for r in responses]
        assert len(set(ids)) == 16
        assert sorted(Queue(settings.queue_name, connection=redis_conn).job_ids) == sorted(ids)
        assert client.get("/readyz").status_code == 503

        beat(redis_conn, settings.key_prefix, WorkerState.ready)
        assert client.get("/readyz").status_code == 200

        job_id = ids[0]
        location = responses[0].headers["location"]
        Queue(settings.queue_name, connection=redis_conn).remove(job_id)
        video = b"\x00\x00\x00\x18ftypmp42" + bytes(5000)
        finish_like_worker(redis_conn, settings, job_id, video)
        job = client.get(location).json()
        assert job["status"] == "succeeded"
        url = job["outputs"]["video"]["url"]
        assert client.get(url).content == video
        part = client.get(url, headers={"Range": "bytes=4-11"})
        assert part.status_code == 206 and part.content == b"ftypmp42"

        assert client.post("/v1/videos", json={"prompt": ""}).status_code == 422
        assert client.delete("/v1/videos").json()["error"]["code"] == "method_not_allowed"
        metrics = client.get("/metrics").text
        assert 'bora_http_requests_total{code="202",method="POST",route="/v1/videos"} 16.0' in metrics
        assert "bora_queue_depth 15.0" in metrics and "bora_workers_ready 1.0" in metrics
