"""Signed webhooks: Standard Webhooks signatures, a destination allowlist, one delivery attempt, retries.

Signing follows https://www.standardwebhooks.com: headers `webhook-id` (the same for every retry of a message,
so receivers can de-duplicate), `webhook-timestamp` (unix seconds of this attempt) and `webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the secret `whsec_<base64 key>`. Any Standard
Webhooks library verifies our deliveries. Each tenant's secret is derived from one master secret
(`tenant_webhook_secret`), so there is nothing per tenant to store or rotate separately.

Why the allowlist: a webhook URL makes our worker send requests where the client says - to the metadata
service, Redis, an intranet host. Only hosts an operator listed are reachable (empty list = webhooks off);
https only; no credentials in the URL; redirects are never followed (a 3xx counts as a failed attempt), since
a redirect would leave the allowlist. The allowlist names hosts and ports (443 unless an entry says otherwise),
not addresses: an operator who lists a host vouches for what it resolves to. A URL is parsed once, by the
sender's own parser, and stored as it normalises it, so the check and the delivery see the same destination. `trust_env=False` keeps proxy variables from rerouting deliveries.

Retries: `BACKOFF_SECONDS[n]` is the wait before attempt n+1, covering a bit over 27 h in total
(BORA_WEBHOOK_BACKOFF_SECONDS replaces it, e.g. with seconds in tests).

Flow: a job state change (worker/lifecycle.py; the API for a cancel while queued; a reaper ending a dead
worker's job, via `notify`) calls `enqueue_event`, which builds the signed-to-be body once and enqueues
`service.webhook_sender.send_webhook` on `{prefix}-webhooks`, in the transition's own transaction.
That task only hands the message to its destination's queue: it re-enqueues it as
`service.webhook_sender.deliver_webhook` under RQ's concurrency limit for the URL's host:port
(`destination_limit`, BORA_WEBHOOK_MAX_PER_DESTINATION deliveries in flight to one destination, across
every sender process), so a receiver that hangs holds at most that many of the sender's workers while the
others keep delivering to everyone else. `deliver_webhook` calls `deliver_attempt`: it delivers, appends the
attempt to the Redis list `{prefix}:job:{id}:webhooks` (what `GET /v1/videos/{id}/webhook-attempts` shows)
and, on failure, re-enqueues itself with `attempt + 1` via `queue.enqueue_in(delay, ...)`, under the same
limit. `python -m service.webhook_sender` runs BORA_WEBHOOK_WORKERS RQ workers with their scheduler. The
tenant, not the secret, travels in the RQ job, so no secret is written to Redis; the sender derives it
(`secret_for`). A message whose job is gone (deleted, or past retention) is dropped, never sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from redis import Redis
from redis.client import Pipeline

from service.jobs.config import Settings
from service.jobs.schemas import WEBHOOK_EVENTS, JobRecord

SECRET_PREFIX = "whsec_"
EVENTS = WEBHOOK_EVENTS
# Wait before attempt 2, 3, ...: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h  (sum: 27.6 h).
BACKOFF_SECONDS = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
MAX_ATTEMPTS = len(BACKOFF_SECONDS)
TOLERANCE_SECONDS = 300
ATTEMPTS_KEPT = 100
USER_AGENT = "bora-webhooks/1"

logger = logging.getLogger(__name__)


class WebhookError(ValueError):
    """Base for webhook problems the caller should report, not crash on."""


class DestinationRejected(WebhookError):
    """The URL is not one we may send to (scheme, credentials, host not allowlisted)."""


class VerificationFailed(WebhookError):
    """A signature or timestamp did not check out."""


# --- secrets and signatures --------------------------------------------------------------------------------


def tenant_webhook_secret(master_secret: str | bytes, tenant: str) -> str:
    """The tenant's signing secret: HMAC(master, tenant). Deterministic, so nothing is stored per tenant."""
    master = master_secret.encode() if isinstance(master_secret, str) else master_secret
    key = hmac.new(master, b"bora-webhook-secret:" + tenant.encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(key).decode()


def _key_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key_bytes(secret), signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance: int = TOLERANCE_SECONDS, now: float | None = None
) -> None:
    """What a receiver does; raises VerificationFailed. Accepts any matching `v1,` entry (key rotation)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, timestamp = lowered["webhook-id"], int(lowered["webhook-timestamp"])
        offered = lowered["webhook-signature"].split()
    except (KeyError, ValueError) as error:
        raise VerificationFailed(f"missing or malformed webhook headers: {error}") from error
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise VerificationFailed(f"timestamp {timestamp} is outside the {tolerance} s tolerance")
    expected = sign(secret, msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise VerificationFailed("no matching signature")


# --- destinations ------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, port: int, allowed: Iterable[tuple[str, int]]) -> bool:
    """Exact host, or `*.suffix` for any subdomain of suffix (not the suffix itself), on the entry's port."""
    host = host.lower().rstrip(".")
    for pattern, allowed_port in allowed:
        if port != allowed_port:
            continue
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
        if pattern == host:
            return True
    return False


def check_destination(url: str, allowed: Iterable[tuple[str, int]], allow_http_loopback: bool = False) -> str:
    """The URL as the sender will use it (parsed once, by httpx, the sender's own parser), or DestinationRejected
    unless it is https (or http to loopback, when explicitly allowed, for tests), carries no credentials, and
    names an allowlisted host:port (Settings.webhook_hosts; 443 unless the entry names a port).

    Whitespace and control characters anywhere are refused: parsers disagree on them (WHATWG strips a tab or
    newline inside a host, RFC 3986 forbids them), and the request must go where the check looked."""
    if any(char.isspace() or unicodedata.category(char) == "Cc" for char in url):
        raise DestinationRejected("whitespace or control characters in the URL are not allowed")
    try:
        parsed = httpx.URL(url)
        port = parsed.port or {"https": 443, "http": 80}.get(parsed.scheme, 0)
    except (httpx.InvalidURL, ValueError) as error:
        raise DestinationRejected(f"invalid URL: {error}") from error
    host = parsed.host
    if not host:
        raise DestinationRejected("the URL has no host")
    if parsed.userinfo:
        raise DestinationRejected("credentials in the URL are not allowed")
    insecure_ok = allow_http_loopback and _is_loopback(host)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and insecure_ok):
        raise DestinationRejected(f"scheme {parsed.scheme!r} is not allowed; use https")
    if not host_allowed(host, port, allowed):
        raise DestinationRejected(f"{host}:{port} is not in the webhook allowlist")
    return str(parsed)


# --- delivery ----------------------------------------------------------------------------------------------


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(16)


def event_body(event: str, payload: Mapping[str, Any], occurred_at: str | None = None) -> bytes:
    """The Standard Webhooks envelope `{type, timestamp, data}`; identical across retries of one message."""
    occurred_at = occurred_at or datetime.now(UTC).isoformat()
    return json.dumps({"type": event, "timestamp": occurred_at, "data": payload}, separators=(",", ":")).encode()


def _body(event: str, payload: Mapping[str, Any] | bytes | str) -> bytes:
    if isinstance(payload, str):
        return payload.encode()
    return payload if isinstance(payload, bytes) else event_body(event, payload)


def deliver(
    url: str,
    event: str,
    payload: Mapping[str, Any] | bytes | str,
    secret: str,
    timeout: float = 10.0,
    *,
    attempt: int = 1,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """POST one signed attempt; never raises for network trouble. Returns the attempt record
    {attempt, at, event, msg_id, ok, status_code, error, duration_ms}. Only 2xx is success; 3xx is not
    followed. `payload` is the event data, or the finished body (bytes/str) when retrying. The response body
    is not read (a hostile receiver cannot make us download much)."""
    msg_id = msg_id or new_message_id()
    body = _body(event, payload)
    record: dict[str, Any] = {
        "attempt": attempt,
        "at": datetime.now(UTC).isoformat(),
        "event": event,
        "msg_id": msg_id,
        "ok": False,
        "status_code": None,
        "error": None,
    }
    started = time.perf_counter()
    try:
        with httpx.Client(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            with client.stream("POST", url, content=body, headers=signed_headers(secret, msg_id, body)) as resp:
                record["status_code"] = resp.status_code
        if resp.is_success:
            record["ok"] = True
        elif resp.is_redirect:
            record["error"] = f"redirect ({resp.status_code}) not followed"
        else:
            record["error"] = f"HTTP {resp.status_code}"
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        record["error"] = f"{type(error).__name__}: {error}"[:300]
    record["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return record


def next_delay(attempt: int, backoff: Sequence[float] = BACKOFF_SECONDS) -> float | None:
    """Seconds to wait before retrying after failed attempt number `attempt` (1-based); None = give up.
    `backoff[n]` is the wait before attempt n+1 (`backoff[0]` is unused), so `len(backoff)` attempts in all."""
    return backoff[attempt] if attempt < len(backoff) else None


# --- attempt log in Redis ----------------------------------------------------------------------------------


def _attempts_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:job:{job_id}:webhooks"


def record_attempt(
    r: Redis, prefix: str, job_id: str, attempt_record: Mapping[str, Any], ttl: int = 7 * 24 * 3600
) -> None:
    """Append to `{prefix}:job:{id}:webhooks` (oldest first, last ATTEMPTS_KEPT kept) with the job's TTL."""
    key = _attempts_key(prefix, job_id)
    pipe = r.pipeline(transaction=True)
    pipe.rpush(key, json.dumps(dict(attempt_record)))
    pipe.ltrim(key, -ATTEMPTS_KEPT, -1)
    pipe.expire(key, ttl)
    pipe.execute()


def attempts(r: Redis, prefix: str, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in r.lrange(_attempts_key(prefix, job_id), 0, -1)]


def _tasks_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:job:{job_id}:webhook-tasks"


def track_task(r: Redis | Pipeline, prefix: str, job_id: str, task_id: str, ttl: int) -> None:
    """Note an RQ task carrying one of the job's messages, so that deleting the job can remove it
    (`drop_tasks`): its body is the job, prompt included."""
    r.sadd(_tasks_key(prefix, job_id), task_id)
    r.expire(_tasks_key(prefix, job_id), ttl)


def drop_tasks(r: Redis, prefix: str, job_id: str) -> None:
    """Remove the job's queued, scheduled and finished webhook tasks (DELETE of the job). One being delivered
    right now is left to finish: the sender drops the messages of a job that is gone."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job, JobStatus

    for raw in r.smembers(_tasks_key(prefix, job_id)):  # type: ignore[union-attr]
        try:
            task = Job.fetch(raw.decode() if isinstance(raw, bytes) else raw, connection=r)
        except NoSuchJobError:
            continue
        if task.get_status() != JobStatus.STARTED:
            task.delete(remove_from_queue=True)
    r.delete(_tasks_key(prefix, job_id))


def deliver_attempt(
    r: Redis,
    queue: Any,
    *,
    prefix: str,
    job_id: str,
    event: str,
    payload: Mapping[str, Any] | bytes | str,
    url: str,
    secret: str,
    attempt: int,
    msg_id: str,
    allowed_hosts: Iterable[tuple[str, int]],
    func: str,
    extra: Mapping[str, Any] | None = None,
    allow_http_loopback: bool = False,
    timeout: float = 10.0,
    ttl: int = 7 * 24 * 3600,
    backoff: Sequence[float] = BACKOFF_SECONDS,
    rate_limit: Any = None,
) -> dict[str, Any]:
    """One attempt of the RQ task: check the destination (again - the allowlist may have changed), deliver,
    record, and schedule `func(job_id=..., event=..., payload=..., url=..., attempt=n+1, msg_id=..., **extra)`
    on `queue` (an rq.Queue) after the backoff when it failed. Retries carry the finished body (a str), so
    every attempt sends the same message under the same `msg_id`; with `rate_limit` (an rq.RateLimit,
    `destination_limit`) under the destination's concurrency limit."""
    body = _body(event, payload)
    try:
        url = check_destination(url, allowed_hosts, allow_http_loopback)
    except DestinationRejected as error:
        record = {"attempt": attempt, "at": datetime.now(UTC).isoformat(), "event": event, "msg_id": msg_id,
                  "ok": False, "status_code": None, "error": str(error), "duration_ms": 0.0}
        record_attempt(r, prefix, job_id, record, ttl)
        return record  # a policy refusal is not retried
    record = deliver(url, event, body, secret, timeout, attempt=attempt, msg_id=msg_id)
    delay = None if record["ok"] else next_delay(attempt, backoff)
    record["next_attempt_in_s"] = delay
    record_attempt(r, prefix, job_id, record, ttl)
    if delay is not None:
        kwargs = {"job_id": job_id, "event": event, "payload": body.decode(), "url": url,
                  "attempt": attempt + 1, "msg_id": msg_id, **(extra or {})}
        retry = queue.enqueue_in(
            timedelta(seconds=delay), func, kwargs=kwargs, job_timeout=int(timeout) + 30, rate_limit=rate_limit
        )
        track_task(r, prefix, job_id, retry.id, ttl)
    return record


# --- events from job state ---------------------------------------------------------------------------------

SEND_FUNCTION = "service.webhook_sender.send_webhook"  # queued with the state change; hands over to:
DELIVER_FUNCTION = "service.webhook_sender.deliver_webhook"  # one attempt, under the destination's limit
PROGRESS_EVERY = 10.0  # percentage points between two `video.progress` events of one job
TASK_RESULT_TTL = 3600


def queue_name(prefix: str) -> str:
    """The RQ queue of webhook deliveries (run by `python -m service.webhook_sender`, never by a GPU worker)."""
    return f"{prefix}-webhooks"


def enqueue_event(
    r: Redis, job: JobRecord, event: str, *, prefix: str, pipeline: Pipeline | None = None
) -> str | None:
    """Queue the first delivery attempt of `event` for `job` if the job's webhook asked for it; returns the
    message id (None: nothing to send). With `pipeline` (a transaction in MULTI mode) the task is only queued
    on it, so it is sent exactly when the caller's transaction commits. The body is built now, so its
    timestamp is when the change happened and every retry sends the same bytes. The tenant travels with the task; the secret never does."""
    hook = job.webhook
    if hook is None or event not in hook.events:
        return None
    from rq import Queue  # here, so that importing this module for signatures does not need rq

    msg_id = new_message_id()
    if not job.store_prompt:  # a receiver, and the queued retries, get the hash only (BORA_STORE_PROMPT=false)
        job = job.without_prompt()
    body = event_body(event, job.public().model_dump(mode="json"))
    task = Queue(queue_name(prefix), connection=r).enqueue_call(
        SEND_FUNCTION,
        kwargs={"job_id": job.id, "event": event, "payload": body.decode(), "url": hook.url,
                "tenant": job.tenant, "attempt": 1, "msg_id": msg_id},
        timeout=120,
        result_ttl=TASK_RESULT_TTL,
        failure_ttl=7 * 24 * 3600,
        description=f"webhook {event} {job.id}",
        pipeline=pipeline,
    )
    track_task(pipeline if pipeline is not None else r, prefix, job.id, task.id, job.retention_s)
    return msg_id


def destination_limit(prefix: str, url: str, concurrency: int) -> Any:
    """RQ's concurrency limit (an rq.RateLimit) for deliveries to the URL's host:port. RQ keeps its slots in
    Redis, so the limit holds across every sender process; a delivery past it waits in RQ, holding no worker."""
    from rq import RateLimit

    try:
        parsed = httpx.URL(url)
        destination = f"{parsed.host}:{parsed.port or {'https': 443, 'http': 80}.get(parsed.scheme, 0)}"
    except (httpx.InvalidURL, ValueError):
        destination = "invalid"  # refused by the allowlist check anyway
    return RateLimit(f"{prefix}:webhooks:{destination}", concurrency)


def notify(r: Redis, job: JobRecord, event: str, *, prefix: str) -> None:
    """`enqueue_event` for a state change the API or a reaper made: the change stands even if this fails."""
    try:
        enqueue_event(r, job, event, prefix=prefix)
    except Exception:
        logger.warning("webhook not queued", extra={"job_id": job.id, "webhook_event": event}, exc_info=True)


def secret_for(settings: Settings, tenant: str | None) -> str | None:
    """The tenant's signing secret (tenant "" when auth is off); None when webhooks are off (no master)."""
    if settings.webhook_secret is None:
        return None
    return tenant_webhook_secret(settings.webhook_secret.get_secret_value(), tenant or "")
