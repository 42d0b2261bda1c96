"""`python -m service.webhook_sender`: deliver signed webhooks from the `{prefix}-webhooks` queue.

Job state changes (worker/lifecycle.py, and the API for a cancel while queued) enqueue
`send_webhook(...)` there via service.jobs.webhooks.enqueue_event. This process runs those tasks in an RQ
`SimpleWorker` with RQ's scheduler, so a failed attempt re-enqueued with `enqueue_in` (the backoff) fires
when due. It is separate from the GPU worker so a slow or dead receiver never holds a GPU; torch-free, it
runs from the API image (compose service `webhooks`). One attempt = service.jobs.webhooks.deliver_attempt (allowlist check,
signed POST without redirects, attempt recorded where the API shows it, retry scheduled on failure).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from redis import Redis
from rq import Queue, SimpleWorker, get_current_job

from service.jobs import logs, webhooks
from service.jobs.config import Settings, get_settings
from service.jobs.connection import connect

logger = logging.getLogger(__name__)


def send_webhook(
    job_id: str,
    event: str,
    payload: str,
    url: str,
    tenant: str | None = None,
    attempt: int = 1,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """One delivery attempt (the RQ task). Never raises for delivery trouble: the attempt is recorded and,
    on failure, the next one scheduled."""
    settings = get_settings()
    current = get_current_job()
    r: Redis = current.connection if current is not None else connect(settings)
    secret = webhooks.secret_for(settings, tenant)
    record = webhooks.deliver_attempt(
        r,
        Queue(webhooks.queue_name(settings.key_prefix), connection=r),
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
        func=webhooks.SEND_FUNCTION,
        extra={"tenant": tenant},
        allow_http_loopback=settings.webhook_allow_http_loopback,
        timeout=settings.webhook_timeout_seconds,
        ttl=settings.job_retention_seconds,
        backoff=settings.webhook_backoff_seconds or webhooks.BACKOFF_SECONDS,
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
    # RQ blocks on the queue: its connection must not time out while idle.
    r = connect(settings, socket_timeout=None)
    queue = Queue(webhooks.queue_name(settings.key_prefix), connection=r)
    worker = SimpleWorker([queue], connection=r)
    logger.info(
        "webhook sender starting",
        extra={"queue": queue.name, "allowed_hosts": settings.webhook_hosts, "worker": worker.name},
    )
    worker.work(burst=burst, logging_level=log_level, with_scheduler=True)
    logger.info("webhook sender stopped", extra={"worker": worker.name})
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
