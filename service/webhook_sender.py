"""`python -m service.webhook_sender`: deliver signed webhooks from the `{prefix}-webhooks` queue.

Job state changes (worker/lifecycle.py, the API, the reapers) enqueue `send_webhook(...)` there via
service.jobs.webhooks.enqueue_event. `send_webhook` hands the message over to `deliver_webhook`, queued under
the destination's concurrency limit (service.jobs.webhooks.destination_limit); one attempt =
service.jobs.webhooks.deliver_attempt (allowlist check, signed POST without redirects, attempt recorded where
the API shows it, retry scheduled on failure). This process runs BORA_WEBHOOK_WORKERS RQ `SimpleWorker`s (an
RQ `WorkerPool`, each with RQ's scheduler, so retries fire when due): deliveries to different receivers run
side by side, and one that hangs holds at most BORA_WEBHOOK_MAX_PER_DESTINATION of them for the timeout.
It is separate from the GPU worker so a slow or dead receiver never holds a GPU; torch-free, it runs from the
API image (compose service `webhooks`).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.worker_pool import WorkerPool

from service.jobs import jobstore, logs, webhooks
from service.jobs.config import Settings, get_settings
from service.jobs.connection import connect

logger = logging.getLogger(__name__)


def _context() -> tuple[Settings, Redis, Queue]:
    settings = get_settings()
    current = get_current_job()
    r: Redis = current.connection if current is not None else connect(settings)
    return settings, r, Queue(webhooks.queue_name(settings.key_prefix), connection=r)


def _job_gone(r: Redis, settings: Settings, job_id: str, event: str, attempt: int) -> bool:
    """A deleted job (or one past retention) gets nothing more: its messages are dropped, not sent."""
    if r.exists(jobstore.Keys(settings.key_prefix).job(job_id)):
        return False
    logger.info("webhook dropped", extra={"event": "webhook.dropped", "job_id": job_id, "webhook_event": event,
                                          "attempt": attempt, "reason": "job_gone"})
    return True


def send_webhook(
    job_id: str,
    event: str,
    payload: str,
    url: str,
    tenant: str | None = None,
    attempt: int = 1,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """The task a state change queues (in its own transaction, where RQ cannot apply a concurrency limit):
    queue the delivery under its destination's limit. Sends nothing itself, so it never waits on a receiver."""
    settings, r, queue = _context()
    if _job_gone(r, settings, job_id, event, attempt):
        return {"dropped": True}
    kwargs = {"job_id": job_id, "event": event, "payload": payload, "url": url, "tenant": tenant,
              "attempt": attempt, "msg_id": msg_id or webhooks.new_message_id()}
    task = queue.enqueue_call(
        webhooks.DELIVER_FUNCTION,
        kwargs=kwargs,
        timeout=int(settings.webhook_timeout_seconds) + 30,
        result_ttl=webhooks.TASK_RESULT_TTL,
        failure_ttl=7 * 24 * 3600,
        description=f"webhook {event} {job_id}",
        rate_limit=webhooks.destination_limit(settings.key_prefix, url, settings.webhook_max_per_destination),
    )
    webhooks.track_task(r, settings.key_prefix, job_id, task.id, settings.job_retention_seconds)
    return {"queued": kwargs["msg_id"]}


def deliver_webhook(
    job_id: str,
    event: str,
    payload: str,
    url: str,
    tenant: str | None = None,
    attempt: int = 1,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """One delivery attempt. Never raises for delivery trouble: the attempt is recorded and, on failure, the
    next one scheduled (under the same destination limit)."""
    settings, r, queue = _context()
    if _job_gone(r, settings, job_id, event, attempt):
        return {"dropped": True}
    secret = webhooks.secret_for(settings, tenant)
    record = webhooks.deliver_attempt(
        r,
        queue,
        prefix=settings.key_prefix,
        job_id=job_id,
        event=event,
        payload=payload,
        url=url,
        secret=secret or "",
        attempt=attempt,
        msg_id=msg_id or webhooks.new_message_id(),
        # Without a secret nothing may be sent: an empty allowlist records the refusal instead.
        allowed_hosts=settings.webhook_hosts if secret else [],
        func=webhooks.DELIVER_FUNCTION,
        extra={"tenant": tenant},
        allow_http_loopback=settings.webhook_allow_http_loopback,
        timeout=settings.webhook_timeout_seconds,
        ttl=settings.job_retention_seconds,
        backoff=settings.webhook_backoff_seconds or webhooks.BACKOFF_SECONDS,
        rate_limit=webhooks.destination_limit(settings.key_prefix, url, settings.webhook_max_per_destination),
    )
    logger.log(
        logging.INFO if record["ok"] else logging.WARNING,
        "webhook attempt",
        extra={"event": "webhook.attempt", "job_id": job_id, "tenant": tenant, "webhook_event": event,
               **{k: record.get(k) for k in ("attempt", "msg_id", "ok", "status_code", "error",
                                             "next_attempt_in_s")}},
    )
    return record


def run(settings: Settings, *, burst: bool = False, log_level: str = "INFO") -> int:
    # RQ blocks on the queue: its connections must not time out while idle.
    r = connect(settings, socket_timeout=None)
    queue = Queue(webhooks.queue_name(settings.key_prefix), connection=r)
    pool = WorkerPool([queue], connection=r, num_workers=settings.webhook_workers, worker_class=SimpleWorker)
    logger.info(
        "webhook sender starting",
        extra={"queue": queue.name, "allowed_hosts": settings.webhook_hosts, "workers": settings.webhook_workers,
               "max_per_destination": settings.webhook_max_per_destination},
    )
    pool.start(burst=burst, logging_level=log_level)
    logger.info("webhook sender stopped", extra={"queue": queue.name})
    return 0


def check(settings: Settings) -> int:
    """Container health: 0 when Redis answers and some RQ worker is registered on the webhooks queue."""
    try:
        r = connect(settings)
        queue = Queue(webhooks.queue_name(settings.key_prefix), connection=r)
        return 0 if SimpleWorker.count(queue=queue) > 0 else 1
    except Exception as exc:  # any failure is "unhealthy"
        logger.warning("health check failed", extra={"error": str(exc)})
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.webhook_sender", description=__doc__.split("\n")[0])
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty (tests)")
    parser.add_argument("--check", action="store_true", help="health probe: is a sender on the queue?")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    if args.check:
        return check(get_settings())
    return run(get_settings(), burst=args.burst, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
