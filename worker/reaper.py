"""Recover jobs whose worker died: no job stays `running` forever. Torch-free (the API may run it too).

A job is orphaned when it is `running`/`canceling` and its worker's heartbeat hash (`P:worker:{wid}`) has
expired (TTL 30 s), e.g. after `kill -9` or a lost machine. Candidates come from RQ's started-job registry
of our queue. An orphan that was being canceled ends `canceled`; one that has had fewer than
`max_attempts` runs goes back to `queued` (and onto the queue, at the front); any other fails `worker_lost`.
Each transition is a guarded jobstore transition, so two reapers racing act on a job once. Every worker
runs `reap` from its heartbeat cadence, without waiting for RQ's 10-minute maintenance pass.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from service import jobstore
from service.config import Settings
from service.errors import InvalidTransition, JobNotFound
from service.schemas import JobPayload, JobRecord, JobStatus, utcnow

logger = logging.getLogger(__name__)

WORKER_FUNCTION = "worker.jobs.run_video_job"
DEFAULT_MAX_ATTEMPTS = 2  # the first run plus one re-queue


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


def reap(r: Redis, settings: Settings, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict[str, str]:
    """Handle every orphaned job once; returns {job_id: "requeued" | "failed" | "canceled"}."""
    prefix = settings.key_prefix
    keys = jobstore.Keys(prefix)
    registry = StartedJobRegistry(settings.queue_name, connection=r)
    done: dict[str, str] = {}
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        record = jobstore.get(r, job_id, prefix=prefix)
        if record is None or record.status not in (JobStatus.running, JobStatus.canceling):
            continue
        if record.worker_id and r.exists(keys.worker(record.worker_id)):
            continue  # its worker is alive
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
