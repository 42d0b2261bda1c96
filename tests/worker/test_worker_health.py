"""The worker's metrics port answers /healthz by heartbeat state: healthy only once the model is loaded."""

from __future__ import annotations

import httpx

from service.jobs.schemas import WorkerState
from tests.support import free_port
from worker.lifecycle import Heartbeat
from worker.main import unhealthy
from worker.metrics import WorkerMetrics


def test_healthz_is_200_only_while_the_worker_takes_jobs(env):
    heartbeat = Heartbeat(env.r, prefix=env.prefix, worker_id=f"{env.prefix}-w")
    metrics = WorkerMetrics()
    port = metrics.serve(free_port(), addr="127.0.0.1", health=lambda: unhealthy(heartbeat))
    base = f"http://127.0.0.1:{port}"

    expected = {
        WorkerState.starting: 503,
        WorkerState.loading: 503,
        WorkerState.ready: 200,
        WorkerState.busy: 200,
        WorkerState.stopping: 503,
        WorkerState.failed: 503,
    }
    for state, code in expected.items():
        heartbeat.update(state=state)
        response = httpx.get(f"{base}/healthz", timeout=5)
        assert response.status_code == code, (state, response.text)
        assert (state.value in response.text) == (code == 503)

    scrape = httpx.get(f"{base}/metrics", timeout=5)
    assert scrape.status_code == 200 and "bora_worker_busy 0.0" in scrape.text
