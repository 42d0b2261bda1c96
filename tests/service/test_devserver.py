"""`bora serve`'s devserver: Redis resolution (given, local, embedded) and child-process supervision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest
from redis import Redis
from rq import Queue

from service import devserver
from service.jobs.config import Settings
from tests.service.conftest import REPO_ROOT, bearer, bora_env
from tests.support import free_port, wait_http


def test_given_url_wins(tmp_path):
    url, handle = devserver.resolve_redis(Settings(redis_url="redis://example:1/3", data_dir=tmp_path))
    assert (url, handle) == ("redis://example:1/3", None)


def test_embedded_redis_even_when_a_local_one_answers(tmp_path, redis_conn):
    """Two `make run`s on one host must not share a queue through whatever answers on 127.0.0.1:6379."""
    assert redis_conn.ping()
    url, handle = devserver.resolve_redis(Settings(data_dir=tmp_path))
    try:
        assert url.startswith("unix://") and handle is not None
    finally:
        devserver.stop_embedded_redis(handle)


def test_embedded_redis_serves_rq_from_another_client(tmp_path):
    url, server = devserver.start_embedded_redis(tmp_path / "data")
    try:
        assert url.startswith("unix://") and str((tmp_path / "data" / "redis").resolve()) in url
        assert devserver.answers(url)
        other = Redis.from_url(url)
        job = Queue("embedded", connection=other).enqueue_call("worker.jobs.run_video_job", args=({},))
        assert Queue("embedded", connection=Redis.from_url(url)).job_ids == [job.id]
        other.close()
    finally:
        devserver.stop_embedded_redis(server)
    assert not devserver.answers(url)
    assert not devserver.answers(f"redis://127.0.0.1:{free_port()}/0")


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_supervise_restarts_a_child_that_dies_and_keeps_the_others():
    sleeper = _python("import time; time.sleep(60)")
    crasher = _python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    starts: list[str] = []

    def restart(name: str) -> subprocess.Popen[bytes]:
        starts.append(name)
        if len(starts) == 2:  # the second restart stays up; then we stop the devserver like Ctrl-C does
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return _python("import time; time.sleep(60)")
        return _python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")

    children = {"api": sleeper, "worker": crasher}
    assert devserver.supervise(children, restart, backoff=(0.1,)) == 0
    assert starts == ["worker", "worker"]
    assert children["api"] is sleeper  # the API was never restarted
    assert all(process.poll() is not None for process in children.values())  # and everything stopped


def test_supervise_gives_up_on_a_child_that_keeps_exiting_at_start():
    sleeper = _python("import time; time.sleep(60)")
    starts: list[str] = []

    def restart(name: str) -> subprocess.Popen[bytes]:
        starts.append(name)
        return _python("raise SystemExit(3)")

    assert devserver.supervise({"api": sleeper, "worker": restart("worker")}, restart, backoff=(0.05,)) == 3
    assert len(starts) == devserver.MAX_QUICK_EXITS
    assert sleeper.poll() is not None


SCRIPT = textwrap.dedent(
    """
    import sys
    from service import devserver
    real = devserver.child_commands
    def commands(settings):
        found = real(settings)
        found["worker"] = [sys.executable, "-c", "import time; time.sleep(600)"]  # the real worker is tested elsewhere
        return found
    devserver.child_commands = commands
    sys.exit(devserver.main())
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_devserver_runs_the_api_and_stops_on_signal(settings, api_key, signum):
    port = free_port()
    env = bora_env(settings, BORA_PORT=str(port))
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, 30, "the devserver")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/videos", json={"prompt": "p"}, headers=bearer(api_key))
        assert response.status_code == 202
        process.send_signal(signum)
        assert process.wait(timeout=25) in (0, -signum, 128 + signum)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
