"""Recover jobs whose worker died: no job stays `running` forever. Torch-free: the API and every worker run it.

A job is orphaned when it is `running`/`canceling` and its worker's heartbeat hash (`P:worker:{wid}`) has
expired (TTL `heartbeat_ttl_seconds`), e.g. after `kill -9` or a lost machine. Candidates come from RQ's
started-job registry of our queue. An orphan that was being canceled ends `canceled`; one that has had fewer
than `reaper_max_attempts` runs goes back to `queued` (and onto the queue, at the front); any other fails
`worker_lost`. Each transition is a guarded jobstore transition, so two reapers racing act on a job once.
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
from rq import Queue
from rq.registry import StartedJobRegistry

from service import jobstore
from service.config import Settings
from service.errors import InvalidTransition, JobNotFound
from service.schemas import JobPayload, JobRecord, JobStatus, utcnow
from service.storage import Storage

logger = logging.getLogger(__name__)

WORKER_FUNCTION = "worker.jobs.run_video_job"


def enqueue(r: Redis, settings: Settings, payload: JobPayload, *, at_front: bool = True) -> None:
    """(Re-)enqueue a job's RQ entry the way the API does (same function, id, time limit)."""
    Queue(settings.queue_name, connection=r).enqueue_call(
        WORKER_FUNCTION,
        args=(payload.model_dump(mode="json"),),
        job_id=payload.job_id,
        timeout=settings.job_timeout_seconds,
        result_ttl=settings.job_retention_seconds,
        failure_ttl=settings.rq_failure_ttl_seconds,
        description=f"video {payload.job_id}",
        at_front=at_front,
    )


def payload_of(record: JobRecord) -> JobPayload:
    return JobPayload(
        job_id=record.id,
        input=record.input,
        seed=record.seed,
        model=record.model,
        request_id=record.request_id,
        tenant=record.tenant,
        metadata=record.metadata,
        enqueued_at=utcnow(),
    )


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
                jobstore.mark_canceled(r, job_id, prefix=prefix)
                outcome = "canceled"
            elif record.attempts < max_attempts:
                jobstore.mark_requeued(r, job_id, prefix=prefix)
                enqueue(r, settings, payload_of(record))
                outcome = "requeued"
            else:
                jobstore.mark_failed(
                    r,
                    job_id,
                    "worker_lost",
                    f"the worker running this job was lost ({record.attempts} attempt(s))",
                    True,
                    prefix=prefix,
                )
                outcome = "failed"
        except (InvalidTransition, JobNotFound):
            continue  # another reaper, or the worker itself, got there first
        r.zrem(registry.key, f"{job_id}:{execution_id}" if execution_id else job_id)
        done[job_id] = outcome
        logger.warning(
            "job.reaped",
            extra={
                "event": "job.reaped",
                "job_id": job_id,
                "request_id": record.request_id,
                "tenant": record.tenant,
                "lost_worker": record.worker_id,
                "outcome": outcome,
                "attempt": record.attempts,
            },
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
