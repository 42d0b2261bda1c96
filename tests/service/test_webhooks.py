"""Webhooks: the Standard Webhooks test vector, the allowlist, real deliveries to a loopback receiver,
redirects refused, and the attempt log + rescheduling against the real Redis (DB 14)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rq import Queue

from service.jobs import webhooks
from service.jobs.config import Settings
from service.jobs.webhooks import (
    BACKOFF_SECONDS,
    DestinationRejected,
    VerificationFailed,
    attempts,
    check_destination,
    deliver,
    deliver_attempt,
    next_delay,
    record_attempt,
    sign,
    tenant_webhook_secret,
    verify,
)
from tests.support import scratch_redis

# Published by the Standard Webhooks specification (and the svix libraries' tests).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def new_secret() -> str:
    return tenant_webhook_secret("test-master", "some-tenant")


def vector_headers(**override):
    return {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS),
            "webhook-signature": VECTOR_SIGNATURE, **override}


def test_signature_matches_the_spec_test_vector():
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE
    verify(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=VECTOR_TS + 10)


def test_verify_detects_tampering_and_stale_timestamps():
    bad = [
        (vector_headers(), b'{"test": 2432232315}'),
        (vector_headers(**{"webhook-id": "msg_other"}), VECTOR_BODY),
        (vector_headers(**{"webhook-timestamp": str(VECTOR_TS + 1)}), VECTOR_BODY),
        (vector_headers(**{"webhook-signature": "v1,AAAA"}), VECTOR_BODY),
        ({"webhook-id": VECTOR_ID}, VECTOR_BODY),
    ]
    for headers, body in bad:
        with pytest.raises(VerificationFailed):
            verify(VECTOR_SECRET, headers, body, now=VECTOR_TS)
    with pytest.raises(VerificationFailed):
        verify(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=VECTOR_TS + 301)
    with pytest.raises(VerificationFailed):
        verify(new_secret(), vector_headers(), VECTOR_BODY, now=VECTOR_TS)
    # Several signatures (key rotation): one match is enough.
    verify(VECTOR_SECRET, vector_headers(**{"webhook-signature": "v1,AAAA " + VECTOR_SIGNATURE}), VECTOR_BODY,
           now=VECTOR_TS)


def test_tenant_secrets_are_derived_distinct_and_stable():
    a1, a2 = tenant_webhook_secret("master", "a"), tenant_webhook_secret(b"master", "a")
    assert a1 == a2 and a1.startswith("whsec_")
    assert tenant_webhook_secret("master", "b") != a1
    assert tenant_webhook_secret("other-master", "a") != a1


def test_allowlist():
    allowed = Settings(webhook_allowed_hosts="hooks.hospital.org, *.clinic.example, hooks.hospital.org:8443, "
                       "127.0.0.1:8080", webhook_secret="s").webhook_hosts
    assert allowed == [("hooks.hospital.org", 443), ("*.clinic.example", 443), ("hooks.hospital.org", 8443),
                       ("127.0.0.1", 8080)]
    assert check_destination("https://hooks.hospital.org/bora", allowed) == "https://hooks.hospital.org/bora"
    assert check_destination("https://HOOKS.hospital.org:8443/x?y=1", allowed) == "https://hooks.hospital.org:8443/x?y=1"
    check_destination("https://hooks.hospital.org:443/", allowed)
    check_destination("https://a.b.clinic.example/", allowed)
    check_destination("http://127.0.0.1:8080/hook", allowed, allow_http_loopback=True)
    rejected = [
        ("https://hooks.hospital.org/x", []),  # empty allowlist = nothing
        ("https://evil.org/x", allowed),
        ("https://hooks.hospital.org.evil.org/", allowed),
        ("https://clinic.example/", allowed),  # *.suffix does not include the suffix itself
        ("https://xclinic.example/", allowed),
        ("https://hooks.hospital.org:6379/", allowed),  # an allowed host, another port: not the webhook service
        ("https://a.clinic.example:8443/", allowed),
        ("http://hooks.hospital.org/", allowed),  # https only
        ("http://127.0.0.1:8080/", allowed),  # http to loopback only when explicitly allowed
        ("http://hooks.hospital.org/", [*allowed]),
        ("https://user:pw@hooks.hospital.org/", allowed),
        ("https://user@hooks.hospital.org/", allowed),
        ("ftp://hooks.hospital.org/", allowed),
        ("https:///nohost", allowed),
        ("https://hooks.hospital.org:99999/", allowed),
        ("file:///etc/passwd", allowed),
        ("https://169.254.169.254/latest/meta-data", allowed),
        # parsers disagree on whitespace and control characters: refused wherever they are
        ("https://hooks.hos\tpital.org/", allowed),
        ("https://hooks.hospital.org/\nx", allowed),
        (" https://hooks.hospital.org/", allowed),
        ("https://hooks.hospital.org/\x00", allowed),
    ]
    for url, hosts in rejected:
        with pytest.raises(DestinationRejected):
            check_destination(url, hosts)


@pytest.mark.parametrize("entry", ["localhost:0", "host:70000", "host:port", "http://host", "a b", "host/path"])
def test_malformed_allowlist_entries_fail_at_start_up(entry):
    with pytest.raises(ValueError, match="BORA_WEBHOOK_ALLOWED_HOSTS entry"):
        Settings(webhook_allowed_hosts=entry, webhook_secret="s")


def test_backoff_covers_a_day():
    assert BACKOFF_SECONDS[0] == 0 and sum(BACKOFF_SECONDS) >= 24 * 3600
    assert BACKOFF_SECONDS[1:] == sorted(BACKOFF_SECONDS[1:])
    assert next_delay(1) == 5 and next_delay(len(BACKOFF_SECONDS)) is None


class Receiver:
    """A real HTTP server on a loopback port that records requests and answers with `status`."""

    def __init__(self, status=204, location=None):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((self.path, dict(self.headers), body))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_delivery_is_signed_and_verifiable():
    secret = tenant_webhook_secret("master", "hospital-a")
    with Receiver(204) as rx:
        record = deliver(rx.url + "/hook", "video.succeeded", {"id": "job-1", "status": "succeeded"}, secret,
                         timeout=5, attempt=1, msg_id="msg_fixed")
    assert record["ok"] and record["status_code"] == 204 and record["error"] is None
    assert record["attempt"] == 1 and record["duration_ms"] >= 0 and record["at"]
    ((path, headers, body),) = rx.received
    assert path == "/hook" and headers["webhook-id"] == "msg_fixed"
    verify(secret, headers, body)
    envelope = json.loads(body)
    assert envelope["type"] == "video.succeeded" and envelope["data"] == {"id": "job-1", "status": "succeeded"}
    with pytest.raises(VerificationFailed):
        verify(tenant_webhook_secret("master", "hospital-b"), headers, body)


def test_redirect_is_a_failure_and_is_not_followed():
    with Receiver(204) as target:
        with Receiver(302, location=target.url + "/stolen") as rx:
            record = deliver(rx.url, "video.failed", {"id": "j"}, new_secret(), timeout=5)
        assert not record["ok"] and record["status_code"] == 302 and "redirect" in record["error"]
        assert len(rx.received) == 1 and target.received == []


def test_server_error_and_unreachable_are_failures_not_exceptions():
    with Receiver(500) as rx:
        record = deliver(rx.url, "video.started", {}, new_secret(), timeout=5)
    assert not record["ok"] and record["status_code"] == 500 and record["error"] == "HTTP 500"
    port = rx.server.server_port  # closed now
    record = deliver(f"http://127.0.0.1:{port}/", "video.started", {}, new_secret(), timeout=2)
    assert not record["ok"] and record["status_code"] is None and "ConnectError" in record["error"]


@pytest.fixture
def r():
    yield from scratch_redis("test-wh")


def test_attempt_log_roundtrip(r):
    client, prefix = r
    record_attempt(client, prefix, "job-1", {"attempt": 1, "ok": False}, ttl=60)
    record_attempt(client, prefix, "job-1", {"attempt": 2, "ok": True}, ttl=60)
    assert attempts(client, prefix, "job-1") == [{"attempt": 1, "ok": False}, {"attempt": 2, "ok": True}]
    assert 0 < client.ttl(f"{prefix}:job:job-1:webhooks") <= 60
    assert attempts(client, prefix, "nope") == []


def _only(receiver: Receiver) -> list[tuple[str, int]]:
    return [("127.0.0.1", receiver.server.server_port)]


def test_failed_attempt_is_recorded_and_rescheduled_with_the_same_message(r):
    client, prefix = r
    queue = Queue(f"{prefix}-webhooks", connection=client)
    secret = tenant_webhook_secret("m", "t")
    common = dict(prefix=prefix, job_id="job-9", event="video.succeeded", secret=secret, msg_id="msg_9",
                  allow_http_loopback=True, func="service.webhook_sender.send_webhook",
                  extra={"tenant": "t"}, timeout=5)
    with Receiver(503) as rx:
        first = deliver_attempt(client, queue, payload={"id": "job-9"}, url=rx.url, allowed_hosts=_only(rx),
                              attempt=1, **common)
    assert not first["ok"] and first["next_attempt_in_s"] == BACKOFF_SECONDS[1]
    (scheduled_id,) = queue.scheduled_job_registry.get_job_ids()
    job = queue.fetch_job(scheduled_id)
    assert job.func_name == "service.webhook_sender.send_webhook"
    assert job.kwargs["attempt"] == 2 and job.kwargs["msg_id"] == "msg_9" and job.kwargs["tenant"] == "t"

    # The retry (what the scheduled job will do) sends the identical body, and succeeds.
    with Receiver(200) as rx2:
        second = deliver_attempt(client, queue, payload=job.kwargs["payload"], url=rx2.url, allowed_hosts=_only(rx2),
                              attempt=2, **common)
    assert second["ok"] and second["next_attempt_in_s"] is None
    assert rx.received[0][2] == rx2.received[0][2]
    verify(secret, rx2.received[0][1], rx2.received[0][2])
    assert [a["attempt"] for a in attempts(client, prefix, "job-9")] == [1, 2]
    assert len(queue.scheduled_job_registry.get_job_ids()) == 1  # nothing more scheduled

    # Last attempt failing: recorded, no further retry.
    with Receiver(500) as rx3:
        last = deliver_attempt(client, queue, payload={}, url=rx3.url, allowed_hosts=_only(rx3),
                              attempt=len(BACKOFF_SECONDS), **common)
    assert last["next_attempt_in_s"] is None
    assert len(queue.scheduled_job_registry.get_job_ids()) == 1


def test_disallowed_destination_is_recorded_not_sent_nor_retried(r):
    client, prefix = r
    queue = Queue(f"{prefix}-webhooks", connection=client)
    with Receiver(204) as rx:
        record = deliver_attempt(client, queue, prefix=prefix, job_id="j", event="video.started", payload={},
                                 url=rx.url, secret=new_secret(), attempt=1, msg_id="m", allowed_hosts=[],
                                 allow_http_loopback=True, func="service.webhook_sender.send_webhook")
    assert not record["ok"] and "allowlist" in record["error"]
    assert rx.received == [] and queue.scheduled_job_registry.get_job_ids() == []
    assert attempts(client, prefix, "j")[0]["error"] == record["error"]


def test_module_lists_the_issue_events():
    assert set(webhooks.EVENTS) == {"video.started", "video.progress", "video.succeeded", "video.failed",
                                    "video.canceled"}
