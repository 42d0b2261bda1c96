"""The whole service on real parts: `uvicorn service.main:app` + `python -m worker.main` as subprocesses,
the machine's Redis (own DB index and key prefix), local storage in a temp dir, the tiny model.

submit over HTTP → queue_position falls → running (progress rises) → succeeded → download → decode; both
/metrics endpoints show the job; SIGTERM stops the worker cleanly.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from worker.video import SYNTHETIC_LABEL, probe_mp4

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/12"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Service:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.prefix = "e2e" + secrets.token_hex(4)
        self.api_port, self.metrics_port = _free_port(), _free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "BORA_REDIS_URL": REDIS_URL,
            "BORA_KEY_PREFIX": self.prefix,
            "BORA_DATA_DIR": str(tmp / "data"),
            "BORA_MODEL_PRESET": "tiny",
            "BORA_MODEL_DIR": str(model_dir),
            "BORA_DEVICE": "cpu",
            "BORA_HOST": "127.0.0.1",
            "BORA_AUTH": "disabled",  # loopback only; keys and tenants are tested in tests/service
            "BORA_PORT": str(self.api_port),
            "BORA_WORKER_METRICS_PORT": str(self.metrics_port),
            "BORA_WORKER_ID": f"{self.prefix}-worker",
            "BORA_HEARTBEAT_INTERVAL_SECONDS": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.logs = tmp
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def service(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Service]:
    r = Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    svc = Service(tmp_path, tiny_model_dir)
    try:
        yield svc
    finally:
        svc.stop()
        keys = set(r.scan_iter(match=f"*{svc.prefix}*", count=1000))
        for job_id in r.zrange(f"{svc.prefix}:jobs", 0, -1):
            keys.update(r.scan_iter(match=f"*{job_id.decode()}*", count=1000))
        if keys:
            r.delete(*keys)
        r.srem("rq:workers", f"{svc.prefix}-worker")
        r.srem("rq:queues", f"rq:queue:{svc.prefix}-videos")


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
    _wait_for(lambda: api.poll() is None and _ok(client, "/healthz"), 30, "the API: " + service.log("api"))

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

    _wait_for(watch, 120, "the jobs to finish", interval=0.05)

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


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False
