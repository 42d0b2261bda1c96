"""The API process logs JSON lines, like the worker: its own loggers (`service.*`, `bora.*`) under a real uvicorn,
with every `extra=` field; uvicorn's loggers keep their own format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import httpx
from rq.registry import StartedJobRegistry

from service.jobs import jobstore, logs
from tests.service.conftest import bearer, bora_env, queued_record
from tests.support import REPO_ROOT, free_port, stop_processes, wait_for, wait_http


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_api_log_lines_are_json_with_their_fields(redis_conn, settings, api_key, tmp_path):
    # A job whose worker died before the API started: the API's reaper finds it.
    orphan = queued_record(prompt="an orphaned heart")
    jobstore.create(redis_conn, orphan, prefix=settings.key_prefix)
    jobstore.mark_running(redis_conn, orphan.id, "ghost", prefix=settings.key_prefix)
    registry = StartedJobRegistry(settings.queue_name, connection=redis_conn)
    redis_conn.zadd(registry.key, {f"{orphan.id}:exec-ghost": time.time() + 600})

    port, log = free_port(), tmp_path / "api.log"
    env = bora_env(settings, BORA_REAPER_INTERVAL_SECONDS="0.2")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", process, 30, "uvicorn", log)
        job = httpx.post(f"{base}/v1/videos", json={"prompt": "a heart"}, headers={**bearer(api_key),
                         "X-Request-ID": "req-json-1"}, timeout=10).json()

        def events() -> dict[str, dict] | None:
            by_event = {line.get("event"): line for line in json_lines(log.read_text())}
            return by_event if {"job.requeued", "job.created"} <= by_event.keys() else None

        by_event = wait_for(events, 15, "the reaper's and the request's lines")
    finally:
        stop_processes([process], timeout=10)

    reaped = by_event["job.requeued"]  # the reaper's line, from a background thread
    assert reaped["logger"] == "bora.audit" and reaped["level"] == "warning" and reaped["job_id"] == orphan.id
    assert reaped["lost_worker"] == "ghost" and reaped["reason"] == "worker_lost" and "prompt_sha256" in reaped
    created = by_event["job.created"]  # a request's line
    assert created["job_id"] == job["id"] and created["request_id"] == "req-json-1" and created["ts"]
    assert "Uvicorn running on" in log.read_text()  # uvicorn's own lines are left as they were


def test_configure_api_is_idempotent_and_leaves_a_configured_process_alone(monkeypatch):
    names = ("bora-test-logs-a", "bora-test-logs-b")
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as under uvicorn: nobody configured logging
    try:
        assert logs.configure_api(loggers=names) and logs.configure_api(loggers=names)
        for name in names:
            logger = logging.getLogger(name)
            assert [type(h.formatter) for h in logger.handlers] == [logs.JsonFormatter]
            assert logger.level == logging.INFO and logger.propagate  # pytest's caplog still sees the records
    finally:
        for name in names:
            logging.getLogger(name).handlers.clear()
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # an embedding app configured logging
    assert not logs.configure_api(loggers=("bora-test-logs-c",))
    assert not logging.getLogger("bora-test-logs-c").handlers
