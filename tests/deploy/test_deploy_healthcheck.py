"""docker/healthcheck.py, the probe the images' HEALTHCHECK and the Kubernetes exec probes run, against a
real HTTP server answering what /healthz and /readyz answer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from deploy_files import REPO_ROOT

SCRIPT = REPO_ROOT / "docker" / "healthcheck.py"
ANSWERS = {  # path -> (status, body)
    "/healthz": (200, {"status": "ok"}),
    "/ready": (200, {"status": "ready", "redis": "ok", "workers_ready": 1}),
    "/no-worker": (503, {"status": "not_ready", "redis": "ok", "workers_ready": 0}),
    "/no-redis": (503, {"status": "not_ready", "redis": "unreachable", "workers_ready": 0}),
    "/broken": (500, {"error": "boom"}),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWERS.get(self.path, (404, {}))
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def probe(*args: str) -> int:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, timeout=30).returncode


@pytest.mark.parametrize(("path", "plain", "no_worker_ok"), [
    ("/healthz", 0, 0),
    ("/ready", 0, 0),
    ("/no-worker", 1, 0),     # the API takes jobs without a worker: ready for Kubernetes
    ("/no-redis", 1, 1),      # without Redis it cannot
    ("/broken", 1, 1),
])
def test_exit_codes(base_url, path, plain, no_worker_ok):
    assert probe(base_url + path) == plain
    assert probe("--no-worker-ok", base_url + path) == no_worker_ok


def test_nothing_listening_is_unhealthy():
    assert probe("--no-worker-ok", "http://127.0.0.1:9/readyz") == 1
