"""The RQ side of a video job: the function a worker runs, the options it is enqueued with, and re-queueing.

A job's RQ entry is written in the same MULTI/EXEC as the job state that says it is queued: at creation
(routes/videos.py: `jobstore.create` and `enqueue` on one pipeline) and when a job goes back to the queue
(`requeue`: `jobstore.mark_requeued` and `enqueue`), so a crash between the two writes cannot leave a job
`queued` in its hash but absent from RQ, where no worker would ever run it.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from rq import Queue

from service.jobs import jobstore
from service.jobs.config import Settings
from service.jobs.schemas import JobPayload, JobRecord, utcnow

WORKER_FUNCTION = "worker.jobs.run_video_job"  # by dotted path: the API never imports the worker (torch)
RQ_RESULT_TTL_SECONDS = 3600  # the result lives in our job hash; RQ's copy is only for debugging


def enqueue(
    r: Redis, settings: Settings, payload: JobPayload, *, pipeline: Pipeline | None = None, at_front: bool = False
) -> None:
    """Put the job's RQ entry on the queue (RQ job id = our job id), on `pipeline` when given (a transaction
    in MULTI mode: the commands are queued on it, the caller executes it)."""
    Queue(settings.queue_name, connection=r).enqueue_call(
        WORKER_FUNCTION,
        args=(payload.model_dump(mode="json"),),
        job_id=payload.job_id,
        timeout=settings.job_timeout_seconds,
        result_ttl=RQ_RESULT_TTL_SECONDS,
        failure_ttl=settings.rq_failure_ttl_seconds,
        description=f"video {payload.job_id}",
        at_front=at_front,
        pipeline=pipeline,
    )


def payload_of(record: JobRecord) -> JobPayload:
    """The worker's payload for a stored job (what the API enqueued when it was created)."""
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


def requeue(r: Redis, job_id: str, settings: Settings, *, at_front: bool = True) -> JobRecord:
    """running -> queued and back on the RQ queue (at the front: it has waited its turn once), in one
    MULTI/EXEC. For a job whose worker died (the reaper) or is shutting down mid-job (the worker itself).
    Returns the queued record; raises InvalidTransition when the job is not `running` (it finished, or is
    being canceled), JobNotFound when it does not exist."""

    def enqueue_on(pipe: Pipeline, record: JobRecord) -> None:
        enqueue(r, settings, payload_of(record), pipeline=pipe, at_front=at_front)

    return jobstore.mark_requeued(r, job_id, prefix=settings.key_prefix, enqueue=enqueue_on)
