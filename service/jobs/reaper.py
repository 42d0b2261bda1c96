"""Recover jobs whose worker died: no job stays `running` forever. Torch-free: the API and every worker run it.

A job is orphaned when it is `running`/`canceling` and its worker's heartbeat hash (`P:worker:{wid}`) has
expired (TTL `heartbeat_ttl_seconds`), e.g. after `kill -9` or a lost machine. Candidates come from RQ's
started-job registry of our queue. An orphan that was being canceled ends `canceled`; one that has had fewer
than `reaper_max_attempts` runs goes back to `queued` (and onto the queue, at the front, in the same
transaction: `queueing.requeue`); any other fails `worker_lost`. Each transition is a guarded jobstore
transition, so two reapers racing act on a job once. A job that ends here sends its webhook (`video.canceled`,
`video.failed`) and, like every state change, writes an audit line (service/jobs/audit.py).
`start()` runs `reap` every `reaper_interval_seconds` in a daemon thread (in each worker, and in the API so
that jobs are recovered even when every worker is gone), without waiting for RQ's 10-minute maintenance pass.

Heartbeat TTL: a worker's heartbeat can expire during a Redis outage longer than the TTL although the worker
lives; its job is not double-run in practice, because the job stops at its next state write (every denoising
step) once Redis is gone, and the worker re-queues it itself (`dead_worker`). Keep the TTL (30 s) well above
`heartbeat_interval_seconds` and the longest gap between two state writes of a job (decode + encode + upload).
Objects of failed jobs that storage could not delete at the time are deleted by `purge_orphans`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from redis import Redis
from rq.registry import StartedJobRegistry

from service.jobs import jobstore, queueing, webhooks
from service.jobs.audit import audit
from service.jobs.config import Settings
from service.jobs.errors import InvalidTransition, JobNotFound
from service.jobs.schemas import JobStatus
from service.jobs.storage import Storage

logger = logging.getLogger(__name__)


def reap(
    r: Redis,
    settings: Settings,
    *,
    max_attempts: int | None = None,
    dead_worker: str | None = None,
    job_ids: Sequence[str] = (),
) -> dict[str, str]:
    """Handle every orphaned job once; returns {job_id: "requeued" | "failed" | "canceled"}.

    `dead_worker`: also treat this worker's jobs as orphans although its heartbeat is alive — a worker that
    lost Redis mid-job and reconnected calls this with its own id while it runs nothing, naming in `job_ids`
    the jobs it abandoned (RQ may have dropped them from its registry already)."""
    prefix = settings.key_prefix
    max_attempts = max_attempts or settings.reaper_max_attempts
    keys = jobstore.Keys(prefix)
    registry = StartedJobRegistry(settings.queue_name, connection=r)
    done: dict[str, str] = {}
    candidates = registry.get_job_and_execution_ids(cleanup=False) + [(job_id, "") for job_id in job_ids]
    for job_id, execution_id in candidates:
        record = jobstore.get(r, job_id, prefix=prefix)
        if record is None or record.status not in (JobStatus.running, JobStatus.canceling):
            continue
        alive = record.worker_id and r.exists(keys.worker(record.worker_id))
        if alive and record.worker_id != dead_worker:
            continue
        try:
            if record.status == JobStatus.canceling:
                outcome, ended = "canceled", jobstore.mark_canceled(r, job_id, prefix=prefix)
                webhooks.notify(r, ended, "video.canceled", prefix=prefix)
            elif record.attempts < max_attempts:
                outcome, ended = "requeued", queueing.requeue(r, job_id, settings)
            else:
                message = f"the worker running this job was lost ({record.attempts} attempt(s))"
                outcome, ended = "failed", jobstore.mark_failed(r, job_id, "worker_lost", message, True, prefix=prefix)
                webhooks.notify(r, ended, "video.failed", prefix=prefix)
        except (InvalidTransition, JobNotFound):
            continue  # another reaper, or the worker itself, got there first
        r.zrem(registry.key, f"{job_id}:{execution_id}" if execution_id else job_id)
        done[job_id] = outcome
        audit(
            f"job.{outcome}", ended, outcome=outcome, request_id=record.request_id, level=logging.WARNING,
            reason="worker_lost", lost_worker=record.worker_id, attempt=record.attempts,
        )
    return done


def orphans_key(prefix: str) -> str:
    """HASH storage key -> job id: objects of failed jobs that could not be deleted at the time."""
    return f"{prefix}:storage:orphans"


def defer_delete(r: Redis, prefix: str, job_id: str, key: str) -> None:
    r.hset(orphans_key(prefix), key, job_id)


def purge_orphans(r: Redis, settings: Settings, storage: Storage) -> list[str]:
    """Delete the deferred objects of jobs that ended without success; returns the keys deleted. Objects of
    a job that is queued or running again (re-queued) wait; a job that succeeded since has rewritten them."""
    prefix = settings.key_prefix
    deleted = []
    orphans: dict[bytes, bytes] = r.hgetall(orphans_key(prefix))  # type: ignore[assignment]
    for raw_key, raw_job in orphans.items():
        key, job_id = raw_key.decode(), raw_job.decode()
        record = jobstore.get(r, job_id, prefix=prefix)
        if record is not None and not record.status.terminal:
            continue
        if record is None or record.status != JobStatus.succeeded:
            storage.delete(key)  # raises while storage is still down: next pass
            deleted.append(key)
        r.hdel(orphans_key(prefix), key)
    if deleted:
        logger.info("storage.orphans_deleted", extra={"event": "storage.orphans_deleted", "keys": deleted})
    return deleted


def start(
    r: Redis, settings: Settings, stop: threading.Event, storage: Storage | None = None
) -> threading.Thread:
    """Every `settings.reaper_interval_seconds` until `stop` is set, in a daemon thread: `reap`, and
    `purge_orphans` when given the storage."""

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_seconds):
            try:
                reap(r, settings)
                if storage is not None:
                    purge_orphans(r, settings, storage)
            except Exception:  # Redis or storage down: try again next round
                logger.warning("reaper pass failed", exc_info=True)

    thread = threading.Thread(target=loop, name="bora-reaper", daemon=True)
    thread.start()
    return thread
