"""A whole service for the client and playground tests, on real parts: two `uvicorn service.main:app`
processes on one Redis prefix and data folder - auth required (a real key) and auth off - and one
`python -m worker.main` with the tiny model; plus `FaultProxy`, a real HTTP proxy on loopback that can
answer 429/503 in the service's place, lose the service's answer, or cut an event stream mid-way.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from service.keys import create_key
from tests.support import (
    delete_stack_keys,
    free_port,
    require_redis,
    stack_env,
    start_process,
    stop_processes,
    wait_http,
)

REDIS_URL = "redis://127.0.0.1:6379/12"
# Small jobs: a couple of seconds on a loaded 2-core CPU.
SHORT = {"num_frames": 8, "height": 32, "width": 48, "num_inference_steps": 2, "sampler": "ddim"}


class Stack:
    def __init__(self, tmp: Path, model_dir: Path, **settings: str) -> None:
        self.prefix = "cl" + secrets.token_hex(4)
        self.tmp = tmp
        self.data = tmp / "data"
        self.data.mkdir()
        self.key = create_key(self.data / "api-keys.json", "clinic")
        self.other_key = create_key(self.data / "api-keys.json", "other")
        self.port, self.open_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"  # auth required
        self.open_base = f"http://127.0.0.1:{self.open_port}"  # auth off
        common = dict(
            BORA_RATE_LIMIT_PER_SECOND="0",
            BORA_WORKER_METRICS_PORT="0",
            BORA_WORKER_ID=f"{self.prefix}-worker",
            BORA_HEARTBEAT_INTERVAL_SECONDS="1",
            BORA_EVENTS_POLL_INTERVAL_SECONDS="0.1",
            BORA_EVENTS_KEEPALIVE_SECONDS="1",
        )
        common.update(settings)
        self.env = stack_env(REDIS_URL, self.prefix, self.data, model_dir, self.port, **common)
        self.env["BORA_AUTH"] = "required"
        self.open_env = {**self.env, "BORA_AUTH": "disabled", "BORA_PORT": str(self.open_port)}
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, env: dict[str, str], *args: str) -> subprocess.Popen:
        proc = start_process([sys.executable, *args], env, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        uvicorn = ("-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--log-level", "warning")
        api = self.spawn("api", self.env, *uvicorn, "--port", str(self.port))
        open_api = self.spawn("api-open", self.open_env, *uvicorn, "--port", str(self.open_port))
        self.spawn("worker", self.env, "-m", "worker.main", "--grace", "5")
        wait_http(f"{self.base}/readyz", api, 180, "the API and a ready worker", log=self.tmp / "api.log",
                  interval=0.2)
        wait_http(f"{self.open_base}/healthz", open_api, 60, "the auth-off API", log=self.tmp / "api-open.log")

    def objects(self, job_id: str) -> Path:
        """The folder of a job's stored files (local storage root `data/videos`, keys `videos/<id>/<attempt>/...`)."""
        return self.data / "videos" / "videos" / job_id

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def audit_lines(self) -> list[dict[str, Any]]:
        out = []
        for name in ("api", "api-open"):
            for line in self.log(name).splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def stop(self) -> None:
        stop_processes(self.procs)


def run_stack(tmp: Path, model_dir: Path, **settings: str) -> Iterator[Stack]:
    """For a fixture to `yield from`: a started Stack, stopped and its Redis keys removed afterwards."""
    r = require_redis(REDIS_URL)
    stack = Stack(tmp, model_dir, **settings)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        delete_stack_keys(r, stack.prefix)
        r.close()


@dataclass
class Fault:
    """What the proxy does to the next request matching `method` and `path` (a prefix)."""

    method: str
    path: str
    status: int | None = None  # answer this instead of the service
    retry_after: str | None = None
    forward_first: bool = False  # send the request on, then throw the service's answer away
    cut_after_events: int | None = None  # forward an event stream, then cut it after this many events
    times: int = 1


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    answered: int | None = None
    faulted: bool = False


@dataclass
class FaultProxy:
    """A real HTTP/1.1 proxy on loopback in front of `upstream`. Every request is recorded in `seen`."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        proxy = self
        self._client = httpx.Client(base_url=self.upstream, timeout=60)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def _take(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method and path.startswith(fault.path) and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("content-length") or 0))
        record = Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()})
        self.seen.append(record)
        fault = self._take(h.command, h.path)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        if fault is not None and fault.status is not None and not fault.forward_first:
            record.faulted = True
            return self._answer(h, record, fault)
        request = self._client.build_request(h.command, h.path, content=body, headers=headers)
        response = self._client.send(request, stream=True)
        try:
            if fault is not None and fault.forward_first:
                response.read()  # the service did the work; its answer is lost on the way back
                record.faulted = True
                return self._answer(h, record, fault)
            record.answered = response.status_code
            h.send_response(response.status_code)
            for name, value in response.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    h.send_header(name, value)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            events = 0
            for chunk in response.iter_raw():
                _chunk(h, chunk)
                events += chunk.count(b"\nid: ") + chunk.startswith(b"id: ")
                if fault is not None and fault.cut_after_events is not None and events >= fault.cut_after_events:
                    record.faulted = True
                    h.wfile.flush()
                    h.connection.shutdown(socket.SHUT_RDWR)  # no closing chunk: a broken transfer
                    h.close_connection = True
                    return
            h.wfile.write(b"0\r\n\r\n")
        finally:
            response.close()

    def _answer(self, h: BaseHTTPRequestHandler, record: Seen, fault: Fault) -> None:
        assert fault.status is not None
        code = {429: "rate_limited", 503: "unavailable"}.get(fault.status, "injected")
        payload = json.dumps({"error": {"type": "injected", "code": code, "message": "injected by the test proxy",
                                        "param": None}}).encode()
        record.answered = fault.status
        h.send_response(fault.status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        if fault.retry_after is not None:
            h.send_header("Retry-After", fault.retry_after)
        h.end_headers()
        h.wfile.write(payload)


def _chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    if data:
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()
