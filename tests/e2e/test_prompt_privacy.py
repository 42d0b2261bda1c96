"""BORA_STORE_PROMPT=false on the whole service (API, worker, webhook sender as subprocesses, the machine's
Redis, local storage, the tiny model): once a job has ended, the prompt is nowhere we keep or send it - not in
the job record, the sidecar, the MP4's tags, the audit lines, the webhooks, nor anywhere in Redis - only its
sha256 is."""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    delete_stack_keys,
    free_port,
    require_redis,
    stack_env,
    start_process,
    stop_processes,
    wait_for,
    wait_http,
)
from worker.video import probe_mp4

REDIS_URL = "redis://127.0.0.1:6379/12"
pytestmark = pytest.mark.slow  # a whole stack: `make test-slow`; tests/service/test_prompt_store.py is the quick check
SHORT = {"num_frames": 8, "height": 32, "width": 48, "num_inference_steps": 2, "sampler": "ddim"}


def _receiver() -> tuple[ThreadingHTTPServer, list[bytes]]:
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, bodies


def _redis_values(r, prefix: str, job_ids: list[str]) -> bytes:
    """Every value Redis holds for the stack and its jobs (hashes, lists, strings, RQ's entries), joined."""
    keys = set(r.scan_iter(match=f"*{prefix}*", count=1000))
    for job_id in job_ids:
        keys.update(r.scan_iter(match=f"*{job_id}*", count=1000))
    out = []
    for key in keys:
        kind = r.type(key)
        if kind == b"hash":
            out += [v for pair in r.hgetall(key).items() for v in pair]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"string":
            out.append(r.get(key))
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
    return b"\n".join(out)


def test_only_the_prompt_hash_outlives_the_job(tmp_path: Path, tiny_model_dir: Path) -> None:
    r = require_redis(REDIS_URL)
    receiver, webhook_bodies = _receiver()
    prefix, port = "pp" + secrets.token_hex(4), free_port()
    env = stack_env(
        REDIS_URL, prefix, tmp_path / "data", tiny_model_dir, port,
        BORA_STORE_PROMPT="false",
        BORA_WORKER_METRICS_PORT="0",
        BORA_WORKER_ID=f"{prefix}-worker",
        BORA_WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.server_address[1]}",
        BORA_WEBHOOK_ALLOW_HTTP_LOOPBACK="true",
        BORA_WEBHOOK_SECRET="privacy-master-secret",
    )
    procs = []
    prompt = f"patient {secrets.token_hex(6)}: left ventricle, apical four-chamber view"
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    webhook = {"url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
               "events": ["video.started", "video.progress", "video.succeeded", "video.canceled"]}
    try:
        procs.append(start_process([sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1",
                                    "--port", str(port), "--log-level", "warning"], env, tmp_path / "api.log"))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", procs[0], 30, "the API", log=tmp_path / "api.log")
        client = httpx.Client(base_url=base, timeout=10)

        # canceled while queued (no worker yet): the API's own terminal transition drops the prompt too
        canceled = client.post("/v1/videos", json={"prompt": prompt, **SHORT, "webhook": webhook}).json()
        assert canceled["input"]["prompt"] == prompt  # kept while the job has not ended: the worker needs it
        assert client.post(f"/v1/videos/{canceled['id']}/cancel").json()["status"] == "canceled"

        job = client.post("/v1/videos", json={"prompt": prompt, **SHORT, "webhook": webhook}).json()
        procs.append(start_process([sys.executable, "-m", "worker.main", "--grace", "5"], env, tmp_path / "worker.log"))
        procs.append(start_process([sys.executable, "-m", "service.webhook_sender"], env, tmp_path / "webhooks.log"))

        def ended() -> dict[str, Any] | None:
            response = client.get(f"/v1/videos/{job['id']}")  # a 503 on a loaded machine: poll again
            body = response.json() if response.status_code == 200 else {"status": "unknown"}
            return body if body["status"] in ("succeeded", "failed", "canceled") else None

        done = wait_for(ended, 120, "the job to end")
        assert done["status"] == "succeeded", done.get("error")
        for record in (done, client.get(f"/v1/videos/{canceled['id']}").json()):
            assert record["input"]["prompt"] is None and record["input"]["prompt_sha256"] == digest

        sidecar = client.get(done["outputs"]["sidecar"]["url"]).content
        assert json.loads(sidecar)["prompt"] is None and json.loads(sidecar)["prompt_sha256"] == digest
        video = client.get(done["outputs"]["video"]["url"]).content
        (tmp_path / "v.mp4").write_bytes(video)
        assert probe_mp4(tmp_path / "v.mp4")["tags"]["description"] == f"prompt sha256:{digest}"

        def events() -> set[str]:
            return {json.loads(body)["type"] for body in list(webhook_bodies)}

        wait_for(lambda: {"video.started", "video.succeeded", "video.canceled"} <= events(), 30, "the webhooks")
        job_ids = [job["id"], canceled["id"]]
        wait_for(lambda: prompt.encode() not in _redis_values(r, prefix, job_ids), 10, "RQ's copy to go")
        stop_processes(procs)
        everything = [sidecar, video, *webhook_bodies] + [
            (tmp_path / f"{name}.log").read_bytes() for name in ("api", "worker", "webhooks")
        ] + [path.read_bytes() for path in (tmp_path / "data").rglob("*") if path.is_file()]
        assert not [blob[:200] for blob in everything if prompt.encode() in blob]
        assert digest.encode() in (tmp_path / "worker.log").read_bytes()  # the audit lines carry the hash
    finally:
        stop_processes(procs)
        receiver.shutdown()
        delete_stack_keys(r, prefix)
