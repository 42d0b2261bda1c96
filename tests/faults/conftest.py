"""Fault-test fixtures: the whole service as real processes on parts the test owns.

Each test starts its OWN Redis (`redis-server` on a spare loopback port, AOF on, data in the test's tmp
folder) and, when it needs one, its own S3 server (moto, in-process, spare port), and stops only those —
never the machine's shared Redis on 6379. The API (`uvicorn service.main:app`) and the workers
(`python -m worker.main`) are subprocesses with the tiny model and short heartbeat / reaper / backoff
settings, so worker loss and outages are detected in about a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.support import free_port, stack_env, start_process, stop_processes, wait_for, wait_http

PREFIX = "bora"  # the Redis server is ours alone: the default prefix is fine
# Small and quick on 2 CPU cores: ~0.1 s per denoising step for the tiny model at this size.
JOB = {"prompt": "a beating heart, ultrasound", "num_frames": 4, "height": 32, "width": 32, "sampler": "ddim"}


FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a measured figure; they are shown in pytest's terminal summary ("fault-test figures")."""
    return request.config.stash.setdefault(FIGURES, []).append


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, [])
    if figures:
        terminalreporter.section("fault-test figures")
        for line in figures:
            terminalreporter.write_line(line)


class RedisServer:
    """A redis-server of our own: AOF with fsync on every write, so a shutdown loses no acknowledged job."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:  # pragma: no cover - environment problem: a failure, never a skip
            pytest.fail("no redis-server binary on PATH (apt-get install redis-server)", pytrace=False)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.folder / "redis.log")],
        )  # fmt: skip
        wait_for(self.answers, 10, "redis-server to answer")

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except RedisError:
            return False

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def stop(self) -> None:
        """SHUTDOWN (AOF flushed), then wait for the process; kill only our own process if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True, timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.process.kill()
            self.process.wait()


class Stack:
    """API + workers as subprocesses against our Redis; logs in the test's tmp folder."""

    def __init__(self, tmp: Path, model_dir: Path, redis: RedisServer, **settings: str) -> None:
        self.tmp = tmp
        self.redis = redis
        self.api_port = free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.env = stack_env(
            redis.url,
            PREFIX,
            tmp / "data",
            model_dir,
            self.api_port,
            BORA_RATE_LIMIT_PER_SECOND="0",
            BORA_WORKER_METRICS_PORT="0",
            BORA_REDIS_TIMEOUT_SECONDS="1",
            BORA_HEARTBEAT_INTERVAL_SECONDS="0.5",
            BORA_HEARTBEAT_TTL_SECONDS="2",
            BORA_REAPER_INTERVAL_SECONDS="1",
            BORA_UPLOAD_ATTEMPTS="2",
            BORA_UPLOAD_BACKOFF_SECONDS="0.2",
        )
        self.env.update(settings)  # the test's own, over the defaults above
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        process = start_process([sys.executable, *args], self.env, self.tmp / f"{name}.log")
        self.processes[name] = process
        return process

    def log(self, name: str, tail: int = 3000) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-tail:]

    def start_api(self) -> subprocess.Popen[bytes]:
        api = self.spawn(
            "api", "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(self.api_port),
            "--log-level", "warning", "--timeout-graceful-shutdown", "10",
        )  # fmt: skip
        wait_http(f"{self.base}/healthz", api, 30, "the API", log=self.tmp / "api.log")
        return api

    def start_worker(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, "-m", "worker.main", *args)

    def wait_ready(self, *workers: subprocess.Popen[bytes], timeout: float = 90) -> None:
        """Until each worker's heartbeat says `ready` (its model is loaded)."""
        r = self.redis.client()

        def ready() -> bool:
            states = {}
            for key in r.scan_iter(f"{PREFIX}:worker:*"):
                beat = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
                states[int(beat.get("pid") or 0)] = beat.get("state")
            for w in workers:
                assert w.poll() is None, f"worker exited {w.returncode}"
            return all(states.get(w.pid) in ("ready", "busy") for w in workers)

        wait_for(ready, timeout, "workers to load the model", interval=0.25)

    def submit(self, client: httpx.Client, n: int, **overrides: Any) -> list[str]:
        ids = []
        for i in range(n):
            response = client.post("/v1/videos", json={**JOB, "seed": i, **overrides})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        return ids

    def jobs(self, client: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
        return {job_id: client.get(f"/v1/videos/{job_id}").json() for job_id in ids}

    def ended(self, client: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """The jobs, once every one is terminal (for wait_for); else None."""
        jobs = self.jobs(client, ids)
        return (
            jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs.values()) else None
        )

    def record(self, job_id: str) -> dict[str, Any]:
        """The job hash straight from Redis (the API's view can be unavailable mid-fault)."""
        raw = self.redis.client().hgetall(f"{PREFIX}:job:{job_id}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def stop(self) -> None:
        stop_processes(self.processes.values())


def error_of(job: dict[str, Any]) -> str | None:
    return (job.get("error") or {}).get("code")


def dump(jobs: dict[str, dict[str, Any]]) -> str:
    return json.dumps(
        {k: (v.get("status"), error_of(v), v.get("attempts")) for k, v in jobs.items()}, indent=1
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_stack(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer
) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(**settings: str) -> Stack:
        stack = Stack(tmp_path, tiny_model_dir, redis_server, **settings)
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()
