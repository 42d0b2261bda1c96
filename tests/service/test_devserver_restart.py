"""`bora serve` keeps the service up when its worker dies: the API answers throughout, the worker comes back
and runs the next job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from tests.service.conftest import REPO_ROOT, bearer, bora_env
from tests.support import free_port, wait_for, wait_http

pytestmark = pytest.mark.slow  # minutes on 2 cores: `make test-slow`, its own CI stage


@pytest.mark.timeout(300)
def test_kill_9_of_the_worker_restarts_it_and_the_api_stays_up(settings, api_key, tiny_model_dir, tmp_path):
    port = free_port()
    env = bora_env(settings, BORA_PORT=str(port), BORA_MODEL_PRESET="tiny", BORA_MODEL_DIR=str(tiny_model_dir),
                   BORA_DEVICE="cpu", BORA_WORKER_METRICS_PORT=str(free_port()), OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
    log = tmp_path / "devserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service.devserver"], cwd=REPO_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200

    try:
        wait_http(f"{base}/healthz", process, 60, "the devserver", log)
        wait_for(ready, 120, "a ready worker", 0.25)
        (worker_pid,) = re.findall(r"worker started \(pid (\d+)\)", log.read_text())
        os.kill(int(worker_pid), signal.SIGKILL)
        wait_for(lambda: "worker restarted" in log.read_text(), 30, "the worker to be restarted", 0.2)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # the API never went away
        wait_for(ready, 120, "the restarted worker to be ready", 0.25)

        body = {"prompt": "a beating heart", "num_frames": 16, "height": 64, "width": 64, "num_inference_steps": 2}
        job = httpx.post(f"{base}/v1/videos", json=body, headers=bearer(api_key), timeout=10).json()

        def done() -> bool:
            response = httpx.get(f"{base}/v1/videos/{job['id']}", headers=bearer(api_key), timeout=5)
            assert response.status_code in (200, 503), response.text  # 503: Redis slow on a loaded machine
            return response.status_code == 200 and response.json()["status"] == "succeeded"

        wait_for(done, 120, "the job to succeed on the restarted worker", 0.25)
        assert process.poll() is None
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    text = log.read_text()
    assert re.search(r"worker exited with status -9; restarting it in 1 s", text), text[-3000:]
