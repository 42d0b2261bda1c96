"""`bora serve`'s devserver: Redis resolution (given, local, embedded) and child-process supervision."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

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


def test_local_redis_is_used_when_it_answers(tmp_path, redis_conn):
    url, handle = devserver.resolve_redis(Settings(data_dir=tmp_path))
    assert url == devserver.LOCAL_REDIS_URL and handle is None


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


def test_supervise_stops_when_a_child_dies():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    quitter = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    start = time.monotonic()
    assert devserver.supervise({"api": sleeper, "worker": quitter}) == 3
    assert time.monotonic() - start < 10
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
