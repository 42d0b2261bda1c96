"""Ctrl-C on `bora serve`: the terminal signals the devserver's whole process group, but only the devserver
may act on it — each child gets exactly one SIGTERM from it, so the worker finishes its job (rather than
force-stopping at once on a second signal) and uvicorn drains; everything exits cleanly.

Ctrl-C is simulated as the terminal sends it: SIGINT to the process group of the devserver (started as the
leader of a session of its own here, so the group is not pytest's).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest
from redis import Redis

from service import devserver
from service.jobs import jobstore
from service.jobs.config import Settings
from tests.service.conftest import REPO_ROOT, bearer, bora_env
from tests.support import free_port, wait_for, wait_http

# Records every SIGINT/SIGTERM it gets; exits 0 one second after the first (time for a duplicate to arrive).
RECORDER = textwrap.dedent(
    """
    import pathlib, signal, sys, time
    log = pathlib.Path(sys.argv[1])
    got = []
    def on_signal(signum, frame):
        got.append(signal.Signals(signum).name)
        log.write_text("\\n".join(got))
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.write_text("")
    while not got:
        time.sleep(0.05)
    time.sleep(1.0)
    """
)

WITH_RECORDERS = textwrap.dedent(
    """
    import sys
    from service import devserver
    folder = sys.argv[1]
    def commands(settings):
        names = ("api", "worker", "webhooks")
        return {name: [sys.executable, "-c", RECORDER, f"{folder}/{name}.signals"] for name in names}
    devserver.child_commands = commands
    sys.exit(devserver.main())
    """
).replace("RECORDER", repr(RECORDER))


def ctrl_c(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # the devserver stops its children
        try:
            process.wait(timeout=devserver.STOP_GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_ctrl_c_sends_each_child_one_sigterm(settings, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", WITH_RECORDERS, str(tmp_path)],
        cwd=REPO_ROOT,
        env=bora_env(settings),
        start_new_session=True,
    )
    logs = {name: tmp_path / f"{name}.signals" for name in ("api", "worker", "webhooks")}
    try:
        wait_for(lambda: all(log.exists() for log in logs.values()), 30, "the children to start")
        ctrl_c(process)
        assert process.wait(timeout=20) == 0
        assert {name: log.read_text().split() for name, log in logs.items()} == {
            name: ["SIGTERM"] for name in logs
        }
    finally:
        stop(process)


def test_the_worker_outlives_its_grace_period_before_being_killed():
    command = devserver.child_commands(Settings(redis_url="redis://x"))
    worker, api = command["worker"], command["api"]
    grace = float(worker[worker.index("--grace") + 1])
    drain = float(api[api.index("--timeout-graceful-shutdown") + 1])
    assert devserver.STOP_GRACE_SECONDS > max(grace, drain) + 10


@pytest.mark.timeout(180)
def test_ctrl_c_lets_the_running_job_finish_and_everything_exits_cleanly(
    settings, api_key, tiny_model_dir, tmp_path
):
    port = free_port()
    env = bora_env(
        settings,
        BORA_PORT=str(port),
        BORA_MODEL_PRESET="tiny",
        BORA_MODEL_DIR=str(tiny_model_dir),
        BORA_DEVICE="cpu",
        BORA_WORKER_METRICS_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "devserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.devserver"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", process, 60, "the devserver", log)
        wait_for(
            lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 90, "a ready worker", 0.25
        )
        body = {
            "prompt": "a beating heart",
            "num_frames": 16,
            "height": 64,
            "width": 64,
            "num_inference_steps": 60,
        }
        response = httpx.post(f"{base}/v1/videos", json=body, headers=bearer(api_key), timeout=10)
        assert response.status_code == 202, response.text
        job_url = f"{base}/v1/videos/{response.json()['id']}"

        def denoising() -> bool:
            job = httpx.get(job_url, headers=bearer(api_key), timeout=5).json()
            return job["status"] == "running" and job["stage"] == "denoising"

        wait_for(denoising, 60, "the job to be denoising", 0.05)
        ctrl_c(process)
        assert process.wait(timeout=devserver.STOP_GRACE_SECONDS + 10) == 0, log.read_text()[-5000:]
    finally:
        stop(process)

    text = log.read_text()
    stopped = dict(re.findall(r"(\w+) stopped \(exit status (-?\d+)\)", text))
    # uvicorn drains, then re-raises the SIGTERM it caught: a clean stop reads as killed-by-SIGTERM.
    assert stopped == {"api": stopped["api"], "worker": "0", "webhooks": "0"}, text[-5000:]
    assert stopped["api"] in ("0", str(-signal.SIGTERM)), text[-5000:]
    assert "force" not in text.lower() and "second stop signal" not in text, text[-5000:]
    # The API is gone: read the job from Redis. It finished within the grace period, on its first run.
    record = jobstore.get(
        Redis.from_url(settings.redis_url), job_url.rsplit("/", 1)[1], prefix=settings.key_prefix
    )
    assert record is not None and record.status == "succeeded" and record.attempts == 1, record
