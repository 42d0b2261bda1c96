"""`python -m service.webhook_sender` as a real process on real Redis, delivering to loopback receivers: a
receiver that hangs holds at most BORA_WEBHOOK_MAX_PER_DESTINATION deliveries while every other receiver
gets its own at once; a message whose job was deleted is dropped, never sent."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rq import Queue

from service.jobs import jobstore, webhooks
from service.jobs.config import Settings
from service.jobs.deletion import delete_job
from service.jobs.schemas import Webhook
from service.jobs.storage import LocalStorage
from tests.service.conftest import REDIS_URL, bora_env, queued_record
from tests.support import start_process, stop_processes, wait_for

pytestmark = pytest.mark.slow  # a sender process and a timed race, ~5 s: `make test-slow`
TIMEOUT_S = 6  # BORA_WEBHOOK_TIMEOUT_SECONDS: how long the sender waits on the hanging receiver


class Receiver:
    """Loopback receiver; `hang` holds every request until released. Records arrival times and the most
    requests it held at once."""

    def __init__(self, hang: bool = False) -> None:
        self.arrivals: list[tuple[float, str]] = []
        self.in_flight = self.most_in_flight = 0
        self.release = threading.Event()
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    receiver.arrivals.append((time.monotonic(), json.loads(body)["data"]["id"]))
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                if hang:
                    receiver.release.wait(60)
                with lock:
                    receiver.in_flight -= 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    hanging, quick = Receiver(hang=True), Receiver()
    yield hanging, quick
    hanging.close()
    quick.close()


def _hooked_job(r, settings: Settings, port: int, retention_seconds: int | None = None) -> str:
    record = queued_record().model_copy(
        update={"webhook": Webhook(url=f"http://127.0.0.1:{port}/hook", events=["video.canceled"])}
    )
    jobstore.create(r, record, prefix=settings.key_prefix, retention_seconds=retention_seconds)
    return record.id


def _queued_tasks(r, settings: Settings) -> list[Any]:
    return Queue(webhooks.queue_name(settings.key_prefix), connection=r).jobs


def test_a_hanging_receiver_does_not_delay_the_others(redis_conn, settings, receivers, tmp_path):
    hanging, quick = receivers
    prefix = settings.key_prefix
    stuck = [_hooked_job(redis_conn, settings, hanging.port) for _ in range(6)]  # queued first
    served = [_hooked_job(redis_conn, settings, quick.port) for _ in range(3)]
    deleted = _hooked_job(redis_conn, settings, quick.port)
    expired = _hooked_job(redis_conn, settings, quick.port, retention_seconds=1)  # gone before it is sent
    for job_id in stuck + served + [deleted, expired]:
        webhooks.enqueue_event(redis_conn, jobstore.get(redis_conn, job_id, prefix=prefix), "video.canceled",
                               prefix=prefix)
    assert len(_queued_tasks(redis_conn, settings)) == 11
    delete_job(redis_conn, LocalStorage(settings.storage_dir), jobstore.get(redis_conn, deleted, prefix=prefix),
               prefix=prefix)
    # DELETE took the job's message off the queue at once (its body is the job, prompt included).
    assert deleted not in [task.kwargs["job_id"] for task in _queued_tasks(redis_conn, settings)]
    wait_for(lambda: not redis_conn.exists(jobstore.Keys(prefix).job(expired)), 5, "the expired job's record")

    env = bora_env(
        settings, BORA_REDIS_URL=REDIS_URL, BORA_WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{hanging.port},127.0.0.1:{quick.port}",
        BORA_WEBHOOK_ALLOW_HTTP_LOOPBACK="true", BORA_WEBHOOK_SECRET="sender-test", BORA_WEBHOOK_BACKOFF_SECONDS="[0]",
        BORA_WEBHOOK_TIMEOUT_SECONDS=str(TIMEOUT_S), BORA_WEBHOOK_WORKERS="4", BORA_WEBHOOK_MAX_PER_DESTINATION="2",
    )
    log = tmp_path / "webhooks.log"
    sender = start_process([sys.executable, "-m", "service.webhook_sender"], env, log)
    try:
        try:
            wait_for(lambda: len(quick.arrivals) == 3, 30, "the quick receiver's deliveries")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; got {quick.arrivals}, the hanging receiver {hanging.arrivals}, still queued "
                f"{Queue(webhooks.queue_name(prefix), connection=redis_conn).job_ids}; sender log:\n"
                f"{log.read_text()[-3000:]}"
            ) from None
        first_hang = min(at for at, _ in hanging.arrivals)
        # The quick receiver was served while the first stuck deliveries still hung (before their timeout) ...
        assert max(at for at, _ in quick.arrivals) - first_hang < TIMEOUT_S
        assert sorted(job_id for _, job_id in quick.arrivals) == sorted(served)
        # ... and the hanging one got its share of the sender's workers, never more.
        wait_for(lambda: hanging.most_in_flight >= 2, TIMEOUT_S, "two deliveries to the hanging receiver")
        assert hanging.most_in_flight == 2
        wait_for(lambda: "webhook.dropped" in log.read_text(), 30, "the expired job's message to be dropped")
        assert not {deleted, expired} & {job_id for _, job_id in quick.arrivals}
        assert webhooks.attempts(redis_conn, prefix, deleted) == webhooks.attempts(redis_conn, prefix, expired) == []
    finally:
        hanging.release.set()
        stop_processes([sender])
