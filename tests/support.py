"""Helpers several test folders share: free ports, polling, subprocesses with logs, Redis set-up and clean-up.

(A plain module, not a conftest: import it as `from tests.support import ...`.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRATCH_REDIS_URL = "redis://127.0.0.1:6379/14"  # the DB index of the unit tests of single Redis helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `predicate()` until it returns something truthy, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_http(
    url: str,
    process: subprocess.Popen,
    timeout: float,
    what: str,
    log: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Until GET `url` answers 200; fails at once (with the tail of `log`) if `process` exits first."""

    def up() -> bool:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"{what} exited ({process.returncode}) before {url} answered\n{tail}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout, what, interval)


def start_process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`command` in the repo root, its stdout and stderr both written to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_processes(processes: Iterable[subprocess.Popen], timeout: float = 15) -> None:
    """SIGTERM every one still running, then wait for each; kill one that outlasts `timeout`."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stack_env(
    redis_url: str, prefix: str, data_dir: Path, model_dir: Path, port: int, **settings: str
) -> dict[str, str]:
    """The environment of an API or worker subprocess: ours without any BORA_* variable, plus the tiny
    model on CPU, the API on loopback with auth off (keys and tenants are tested in tests/service), and
    `settings` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env.update(
        BORA_REDIS_URL=redis_url,
        BORA_KEY_PREFIX=prefix,
        BORA_DATA_DIR=str(data_dir),
        BORA_MODEL_PRESET="tiny",
        BORA_MODEL_DIR=str(model_dir),
        BORA_DEVICE="cpu",
        BORA_HOST="127.0.0.1",
        BORA_PORT=str(port),
        BORA_AUTH="disabled",
        OMP_NUM_THREADS="1",
    )
    env.update(settings)
    return env


def moto_s3() -> Iterator[str]:
    """For a fixture to `yield from`: the URL of moto's S3 server over HTTP on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def require_redis(url: str, **kwargs: Any) -> Redis:
    """A client of the machine's Redis at `url`. None answering FAILS the test: a machine without the Redis
    the suite needs is broken, and a run of skips would pass it as green."""
    r = Redis.from_url(url, **kwargs)
    try:
        r.ping()
    except Exception as exc:  # pragma: no cover - environment problem, reported as a failure
        pytest.fail(f"no Redis at {url} ({exc}); start one: redis-server --port 6379 --save ''", pytrace=False)
    return r


def scratch_redis(name: str) -> Iterator[tuple[Redis, str]]:
    """For a fixture to `yield from`: (client of DB 14, a fresh key prefix `name-xxxxxxxx`); afterwards every
    key of the prefix, RQ's included, is deleted."""
    client = require_redis(SCRATCH_REDIS_URL, socket_timeout=5)
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    yield client, prefix
    for pattern in (f"{prefix}:*", f"rq:*{prefix}*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
    client.close()


def delete_stack_keys(r: Redis, prefix: str) -> None:
    """Remove what a whole stack (API, worker, webhook sender) left under `prefix`: its keys, those of its
    jobs (RQ's included), and its worker and queues in RQ's registries."""
    keys = set(r.scan_iter(match=f"*{prefix}*", count=1000))
    for job_id in r.zrange(f"{prefix}:jobs", 0, -1):
        keys.update(r.scan_iter(match=f"*{job_id.decode()}*", count=1000))
    if keys:
        r.delete(*keys)
    r.srem("rq:workers", f"{prefix}-worker")
    r.srem("rq:queues", f"rq:queue:{prefix}-videos", f"rq:queue:{prefix}-webhooks")
