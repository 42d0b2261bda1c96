"""Cancellation, live events, signed webhooks and the audit trail on the whole service, on real parts:
`uvicorn service.main:app`, `python -m worker.main` (tiny model) and `python -m service.webhook_sender` as
subprocesses, the machine's Redis (own DB index and key prefix), and a loopback HTTP receiver that checks
every webhook signature with service.jobs.webhooks.verify."""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.jobs.webhooks import VerificationFailed, verify
from tests.support import (
    REPO_ROOT,
    delete_stack_keys,
    free_port,
    require_redis,
    stack_env,
    start_process,
    stop_processes,
    wait_for,
    wait_http,
)

REDIS_URL = "redis://127.0.0.1:6379/12"
SHORT = {"num_frames": 8, "height": 32, "width": 48, "num_inference_steps": 2, "sampler": "ddim"}
# ~100 steps on 16 × 128 × 128: long enough to cancel mid-denoising on a loaded CPU.
LONG = {"num_frames": 16, "height": 128, "width": 128, "num_inference_steps": 100, "sampler": "ddim"}


_wait_for = functools.partial(wait_for, interval=0.05)  # this module polls twice as often


class Receiver:
    """Webhook receiver on loopback: /ok answers 204, /fail 500, /redirect 302 to /ok?via=redirect."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "at": time.monotonic()})
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/ok?via=redirect")
                else:
                    self.send_response(204 if self.path.startswith("/ok") else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        out = []
        for item in list(self.received):
            envelope = json.loads(item["body"])
            if envelope["data"]["id"] == job_id:
                out.append({**item, "envelope": envelope})
        return out


class Service:
    def __init__(self, tmp: Path, model_dir: Path, receiver_port: int) -> None:
        self.prefix = "ev" + secrets.token_hex(4)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = stack_env(
            REDIS_URL,
            self.prefix,
            tmp / "data",
            model_dir,
            self.port,
            BORA_RATE_LIMIT_PER_SECOND="0",
            BORA_WORKER_METRICS_PORT="0",
            BORA_WORKER_ID=f"{self.prefix}-worker",
            BORA_HEARTBEAT_INTERVAL_SECONDS="1",
            BORA_WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver_port}",
            BORA_WEBHOOK_ALLOW_HTTP_LOOPBACK="true",
            BORA_WEBHOOK_SECRET="e2e-master-secret",
            BORA_WEBHOOK_BACKOFF_SECONDS="[0, 2, 2]",
            BORA_EVENTS_POLL_INTERVAL_SECONDS="0.05",
            BORA_EVENTS_KEEPALIVE_SECONDS="0.1",
        )
        self.logs = tmp
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        proc = start_process([sys.executable, *args], self.env, self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def json_lines(self, name: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.log(name).splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir: Path) -> Iterator[tuple[Service, httpx.Client, Receiver]]:
    r = require_redis(REDIS_URL)
    receiver = Receiver()
    svc = Service(tmp_path_factory.mktemp("events"), tiny_model_dir, receiver.server.server_address[1])
    client = httpx.Client(base_url=svc.base, timeout=10)
    try:
        api = svc.spawn("api", "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port",
                        str(svc.port), "--log-level", "warning")
        svc.spawn("worker", "-m", "worker.main", "--grace", "5")
        svc.spawn("webhooks", "-m", "service.webhook_sender")
        wait_http(
            f"{svc.base}/readyz", api, 120, "the API and a ready worker", log=svc.logs / "api.log", interval=0.2
        )
        yield svc, client, receiver
    finally:
        client.close()
        receiver.server.shutdown()
        svc.stop()
        delete_stack_keys(r, svc.prefix)


def _submit(client: httpx.Client, body: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
    headers = {"X-Request-ID": request_id} if request_id else {}
    response = client.post("/v1/videos", json=body, headers=headers)
    assert response.status_code == 202, response.text
    if request_id:
        assert response.headers["x-request-id"] == request_id
    return response.json()


def _terminal(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = client.get(f"/v1/videos/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "canceled") else None


class Stream:
    """Reads `GET /v1/videos/{id}/events` in a thread: events (id, data) and keep-alive comments, in order."""

    def __init__(self, base: str, job_id: str, last_event_id: str | None = None) -> None:
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.keepalives = 0
        self.status_code: int | None = None
        self.content_type = ""
        self.ended = threading.Event()
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.thread = threading.Thread(target=self._read, args=(base, job_id, headers), daemon=True)
        self.thread.start()

    def _read(self, base: str, job_id: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", f"{base}/v1/videos/{job_id}/events", headers=headers, timeout=60) as resp:
                self.status_code, self.content_type = resp.status_code, resp.headers.get("content-type", "")
                event_id, data = None, None
                for line in resp.iter_lines():
                    if line.startswith(": keep-alive"):
                        self.keepalives += 1
                    elif line.startswith("id: "):
                        event_id = int(line[4:])
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                    elif line == "" and data is not None:
                        self.events.append((event_id, data))
                        event_id, data = None, None
        finally:
            self.ended.set()

    def wait(self, timeout: float = 120) -> Stream:
        assert self.ended.wait(timeout), "the event stream did not end"
        return self


def test_webhooks_are_signed_retried_with_backoff_and_never_follow_redirects(service) -> None:
    svc, client, receiver = service
    assert client.post("/v1/videos", json={"prompt": "x", "webhook": {"url": "https://evil.example/h"}}
                       ).json()["error"]["code"] == "webhook_not_allowed"
    secret = client.get("/v1/webhook-secret").json()["secret"]
    probe = subprocess.run([sys.executable, "-m", "service.webhook_sender", "--check"], cwd=REPO_ROOT,
                           env=svc.env, capture_output=True, timeout=30)
    assert probe.returncode == 0, probe.stderr  # the compose healthcheck: a sender listens on the queue
    assert secret.startswith("whsec_")
    every = ["video.started", "video.progress", "video.succeeded", "video.failed", "video.canceled"]
    ok = _submit(client, {"prompt": "ok", **SHORT, "webhook": {"url": f"{receiver.url}/ok", "events": every}})
    failing = _submit(client, {"prompt": "fail", **SHORT, "webhook": {"url": f"{receiver.url}/fail"}})
    moved = _submit(client, {"prompt": "moved", **SHORT, "webhook": {"url": f"{receiver.url}/redirect"}})
    assert ok["webhook"]["events"] == every
    assert failing["webhook"]["events"] == ["video.started", "video.succeeded", "video.failed", "video.canceled"]
    for job in (ok, failing, moved):
        assert _wait_for(lambda j=job: _terminal(client, j["id"]), 120, "jobs")["status"] == "succeeded"

    # Every delivery verifies with the tenant's secret. Deliveries run side by side, so they may arrive in any
    # order; `data.version` orders them: started first, progress rising, succeeded last.
    def delivered() -> list[dict[str, Any]] | None:
        got = sorted(receiver.for_job(ok["id"]), key=lambda item: item["envelope"]["data"]["version"])
        return got if got and got[-1]["envelope"]["type"] == "video.succeeded" else None

    got = _wait_for(delivered, 30, "the webhooks of the ok job: " + svc.log("webhooks")[-2000:])
    for item in got:
        verify(secret, item["headers"], item["body"])
    with pytest.raises(VerificationFailed):
        verify(secret.replace("whsec_", "whsec_A"), got[0]["headers"], got[0]["body"])
    types = [item["envelope"]["type"] for item in got]
    assert types[0] == "video.started" and types[-1] == "video.succeeded", types
    progress = [item["envelope"]["data"]["progress"] for item in got if item["envelope"]["type"] == "video.progress"]
    assert progress and progress == sorted(progress), types
    assert len({item["headers"]["webhook-id"] for item in got}) == len(got)  # one message id per event

    # A 500 is retried after the (test-short) backoff, as the same message, until the attempts run out.
    def three_each() -> list[dict[str, Any]] | None:
        data = client.get(f"/v1/videos/{failing['id']}/webhook-attempts").json()["data"]
        return data if len(data) == 6 else None

    attempts = _wait_for(three_each, 30, "3 attempts for each of 2 events")
    started = [a for a in attempts if a["event"] == "video.started"]
    assert [a["attempt"] for a in started] == [1, 2, 3] and len({a["msg_id"] for a in started}) == 1
    assert all(a["status_code"] == 500 and not a["ok"] for a in started)
    assert [a["next_attempt_in_s"] for a in started] == [2, 2, None]
    hits = [i for i in receiver.received if i["path"] == "/fail" and i["headers"]["webhook-id"] == started[0]["msg_id"]]
    # RQ schedules to the whole second: a 2 s backoff waits more than 1 s.
    assert len(hits) == 3 and all(b["at"] - a["at"] > 1 for a, b in zip(hits, hits[1:], strict=False))
    for hit in hits:  # every retry is signed afresh and verifies
        verify(secret, hit["headers"], hit["body"])

    # A redirect is a failed attempt; its target is never requested.
    moved_attempts = _wait_for(
        lambda: (d := client.get(f"/v1/videos/{moved['id']}/webhook-attempts").json()["data"]) and d, 30, "attempts"
    )
    assert moved_attempts[0]["status_code"] == 302 and "not followed" in moved_attempts[0]["error"]
    assert not [i for i in receiver.received if i["path"] == "/ok?via=redirect"]
    # The attempts of a job are the job's: an unknown id is 404 like every job route.
    assert client.get("/v1/videos/vid_nope/webhook-attempts").status_code == 404


def test_cancel_live_events_and_audit_trail(service) -> None:
    svc, client, receiver = service
    long = _submit(client, {"prompt": "a long heartbeat", **LONG, "seed": 1,
                            "webhook": {"url": f"{receiver.url}/ok"}}, request_id="req-e2e-long")
    queued = _submit(client, {"prompt": "never runs", **SHORT}, request_id="req-e2e-queued")
    after = _submit(client, {"prompt": "runs after the cancel", **SHORT}, request_id="req-e2e-after")
    long_stream = Stream(svc.base, long["id"])
    after_stream = Stream(svc.base, after["id"])

    # Queued: canceled at once, never starts.
    canceled = client.post(f"/v1/videos/{queued['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert client.post(f"/v1/videos/{queued['id']}/cancel").json()["status"] == "canceled"  # a retry: same

    # Running: cancel mid-denoising; the worker stops within one step.
    running = _wait_for(
        lambda: (j := client.get(f"/v1/videos/{long['id']}").json())["status"] == "running" and (j["step"] or 0) >= 30
        and j, 120, "the long job to be denoising", interval=0.01,
    )
    response = client.post(f"/v1/videos/{long['id']}/cancel", headers={"X-Request-ID": "req-e2e-cancel"})
    assert response.status_code == 200, response.text
    at_cancel = response.json()
    assert at_cancel["status"] == "canceling" and at_cancel["step"] < at_cancel["total_steps"], at_cancel
    final = _wait_for(lambda: _terminal(client, long["id"]), 60, "the cancel")
    assert final["status"] == "canceled" and final["error"]["code"] == "canceled" and final["outputs"] is None
    assert running["step"] <= at_cancel["step"] and final["step"] <= at_cancel["step"] + 1, (at_cancel, final)

    # The worker moved on: the next job succeeds; the canceled queued one never started.
    assert _wait_for(lambda: _terminal(client, after["id"]), 120, "the next job")["status"] == "succeeded"
    never = client.get(f"/v1/videos/{queued['id']}").json()
    assert never["status"] == "canceled" and never["started_at"] is None and never["step"] is None

    # Live events of the long job: in order, ids rising, ending at `canceled`.
    long_stream.wait()
    assert long_stream.status_code == 200 and long_stream.content_type.startswith("text/event-stream")
    ids = [event_id for event_id, _ in long_stream.events]
    statuses = [data["status"] for _, data in long_stream.events]
    # (`canceling` lasts one step, shorter than a poll: the stream may or may not catch it.)
    assert ids == sorted(set(ids)) and statuses[-1] == "canceled" and "running" in statuses, statuses
    steps = [data["step"] or 0 for _, data in long_stream.events]
    assert steps == sorted(steps) and max(steps) == final["step"]
    # ... and of the job that waited behind it: queued (with keep-alives while nothing changed), rising
    # progress while it ran, then succeeded, and the stream ends by itself.
    after_stream.wait()
    statuses = [data["status"] for _, data in after_stream.events]
    progress = [data["progress"] for _, data in after_stream.events]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses, statuses
    assert progress == sorted(progress) and progress[-1] == 100 and len(set(progress)) >= 3, progress
    assert after_stream.keepalives >= 1
    # Resume: after the next-to-last event only the last one comes; after the last, nothing.
    last_id, last = after_stream.events[-1]
    resumed = Stream(svc.base, after["id"], last_event_id=str(after_stream.events[-2][0])).wait()
    assert resumed.events == [(last_id, last)]
    assert Stream(svc.base, after["id"], last_event_id=str(last_id)).wait().events == []
    assert Stream(svc.base, "vid_unknown").wait().status_code == 404

    # Webhooks of the long job: started, then canceled.
    got = _wait_for(lambda: (g := receiver.for_job(long["id"])) and len(g) == 2 and g, 30, "2 webhooks")
    assert [item["envelope"]["type"] for item in got] == ["video.started", "video.canceled"]

    # Audit trail: the API's lines and the worker's carry the request id and the prompt's sha256.
    digest = hashlib.sha256(b"a long heartbeat").hexdigest()
    api_lines = [line for line in svc.json_lines("api") if line.get("job_id") == long["id"]]
    assert [line["event"] for line in api_lines] == ["job.created", "job.cancel_requested"], api_lines
    assert api_lines[0]["request_id"] == "req-e2e-long" and api_lines[0]["prompt_sha256"] == digest
    assert api_lines[1]["request_id"] == "req-e2e-cancel" and api_lines[1]["job_request_id"] == "req-e2e-long"
    worker_lines = {line["event"]: line for line in svc.json_lines("worker") if line.get("job_id") == long["id"]}
    for event in ("job.running", "job.canceled"):
        line = worker_lines[event]
        assert line["request_id"] == "req-e2e-long" and line["prompt_sha256"] == digest, line
        assert line["tenant"] == "default" and line["params"]["num_inference_steps"] == 100
    assert worker_lines["job.canceled"]["outcome"] == "canceled"
    assert "a long heartbeat" not in svc.log("worker") and "a long heartbeat" not in svc.log("api")
    queued_lines = [line for line in svc.json_lines("api") if line.get("job_id") == queued["id"]]
    assert [line["event"] for line in queued_lines] == ["job.created", "job.canceled"]
    assert not [line for line in svc.json_lines("worker")
                if line.get("job_id") == queued["id"] and line.get("event") == "job.running"]
