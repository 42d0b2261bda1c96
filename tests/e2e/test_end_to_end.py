"""The whole service on real parts: `uvicorn service.main:app` + `python -m worker.main` as subprocesses,
the machine's Redis (own DB index and key prefix), local storage in a temp dir, the tiny model.

submit over HTTP → queue_position falls → running (progress rises) → succeeded → download → decode; both
/metrics endpoints show the job; SIGTERM stops the worker cleanly.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    delete_stack_keys,
    free_port,
    require_redis,
    stack_env,
    start_process,
    stop_processes,
    wait_for,
    wait_http,
)
from worker.video import SYNTHETIC_LABEL, probe_mp4

REDIS_URL = "redis://127.0.0.1:6379/12"


class Service:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.prefix = "e2e" + secrets.token_hex(4)
        self.api_port, self.metrics_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.env = stack_env(
            REDIS_URL,
            self.prefix,
            tmp / "data",
            model_dir,
            self.api_port,
            BORA_WORKER_METRICS_PORT=str(self.metrics_port),
            BORA_WORKER_ID=f"{self.prefix}-worker",
            BORA_HEARTBEAT_INTERVAL_SECONDS="1",
        )
        self.logs = tmp
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        proc = start_process([sys.executable, *args], self.env, self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture
def service(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Service]:
    r = require_redis(REDIS_URL)
    svc = Service(tmp_path, tiny_model_dir)
    try:
        yield svc
    finally:
        svc.stop()
        delete_stack_keys(r, svc.prefix)


def test_submit_poll_download(service: Service, tmp_path: Path) -> None:
    api = service.spawn(
        "api",
        "-m",
        "uvicorn",
        "service.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(service.api_port),
        "--log-level",
        "warning",
    )
    client = httpx.Client(base_url=service.base, timeout=10)
    wait_http(f"{service.base}/healthz", api, 30, "the API", log=service.logs / "api.log")

    # Three jobs before any worker exists: they wait, in order.
    body = {
        "prompt": "a beating heart, echocardiography",
        "num_frames": 8,
        "height": 32,
        "width": 48,
        "fps": 8,
        "num_inference_steps": 2,
        "sampler": "ddim",
    }
    created = [client.post("/v1/videos", json={**body, "seed": i}) for i in range(3)]
    assert [r.status_code for r in created] == [202, 202, 202], created[0].text
    ids = [r.json()["id"] for r in created]
    assert [client.get(f"/v1/videos/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]
    assert client.get("/readyz").status_code == 503

    worker = service.spawn("worker", "-m", "worker.main", "--grace", "5")
    last = ids[-1]
    positions, progress = [], []

    def watch() -> bool:
        assert worker.poll() is None, service.log("worker")
        job = client.get(f"/v1/videos/{last}").json()
        if job["status"] == "queued":
            positions.append(job["queue_position"])
        else:
            progress.append(job["progress"])
        return job["status"] in ("succeeded", "failed", "canceled")

    wait_for(watch, 120, "the jobs to finish", interval=0.05)

    assert positions == sorted(positions, reverse=True) and positions[0] == 3 and positions[-1] < 3
    assert progress == sorted(progress) and progress[-1] == 100
    assert client.get("/readyz").status_code == 200

    jobs = [client.get(f"/v1/videos/{i}").json() for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs[0].get("error")
    job = jobs[0]
    assert job["seed"] == 0 and job["weights_sha256"] and job["timings"]["total_s"] > 0
    video = job["outputs"]["video"]
    assert (video["frames"], video["height"], video["width"], video["fps"]) == (8, 32, 48, 8)

    download = client.get(video["url"])
    assert download.status_code == 200 and download.headers["content-type"].startswith("video/mp4")
    assert len(download.content) == video["bytes"]
    path = tmp_path / "download.mp4"
    path.write_bytes(download.content)
    info = probe_mp4(path)
    assert (info["frames"], info["height"], info["width"], info["fps"]) == (8, 32, 48, 8.0)
    assert info["faststart"] and info["tags"]["comment"] == SYNTHETIC_LABEL
    thumb = client.get(job["outputs"]["thumbnail"]["url"])
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    sidecar = client.get(job["outputs"]["sidecar"]["url"])
    assert sidecar.status_code == 200 and sidecar.headers["content-type"].startswith("application/json")
    assert sidecar.json()["seed"] == 0 and "AI-generated" in json.dumps(sidecar.json(), ensure_ascii=False)

    api_metrics = client.get("/metrics").text
    assert 'bora_jobs_submitted_total{model="tiny"} 3.0' in api_metrics
    assert 'bora_jobs_finished_total{code="",status="succeeded"} 3.0' in api_metrics
    assert "bora_workers_ready 1.0" in api_metrics and "bora_queue_depth 0.0" in api_metrics
    worker_metrics = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).text
    assert 'bora_worker_jobs_total{code="",status="succeeded"} 3.0' in worker_metrics
    assert "bora_worker_denoising_steps_total 6.0" in worker_metrics
    assert 'bora_worker_stage_duration_seconds_count{stage="total"} 3.0' in worker_metrics
    assert 'bora_worker_info{device="cpu",dtype="float32",model="tiny"' in worker_metrics
    assert 'bora_worker_gpu_memory_bytes{kind="allocated"} 0.0' in worker_metrics

    # SIGTERM: a clean exit; the heartbeat goes with it, so the API is no longer ready.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, service.log("worker")
    assert client.get("/readyz").status_code == 503
    assert '"event": "job.succeeded"' in service.log("worker") or "job.succeeded" in service.log("worker")
