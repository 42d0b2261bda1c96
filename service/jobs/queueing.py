"""The RQ side of a video job: the function a worker runs, the options it is enqueued with, and re-queueing.

A job's RQ entry is written in the same MULTI/EXEC as the job state that says it is queued: at creation
(`jobstore.create(enqueue=...)`) and when a job goes back to the queue (`requeue`: `jobstore.mark_requeued`
and `enqueue`), so a crash between the two writes cannot leave a job `queued` in its hash but absent from RQ.
A job whose RQ entry was lost anyway (its worker died between dequeue and start) is put back by
`restore_entry` (the reaper).

Timeouts: the worker stops a job at its own limit (the job's `timeout_seconds`, at most
BORA_JOB_TIMEOUT_SECONDS) between steps and fails it `timeout`; RQ's hard kill is set
BORA_RQ_TIMEOUT_MARGIN_SECONDS later, as a last resort that the clean path always beats.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue

from service.jobs import jobstore
from service.jobs.config import Settings
from service.jobs.schemas import JobPayload, JobRecord, utcnow

WORKER_FUNCTION = "worker.jobs.run_video_job"  # by dotted path: the API never imports the worker (torch)
RQ_RESULT_TTL_SECONDS = 3600  # the result lives in our job hash; RQ's copy is only for debugging


def run_limit(settings: Settings, timeout_seconds: int | None) -> int:
    """A job's run-time limit: what it asked for, at most (and by default) the server's."""
    return min(timeout_seconds or settings.job_timeout_seconds, settings.job_timeout_seconds)


def run_deadline(settings: Settings, timeout_seconds: int | None) -> float:
    """Seconds after a run starts by which it must have ended (else it counts as overdue)."""
    return run_limit(settings, timeout_seconds) + settings.rq_timeout_margin_seconds + 2 * settings.heartbeat_ttl_seconds


def queued_deadline(settings: Settings, timeout_seconds: int | None) -> float:
    """Seconds after a job is queued by which it must have ended: expiry, then a full run."""
    return settings.queued_expiry_seconds + settings.reaper_interval_seconds + run_deadline(settings, timeout_seconds)


def enqueue(
    r: Redis, settings: Settings, payload: JobPayload, *, pipeline: Pipeline | None = None, at_front: bool = False
) -> None:
    """Put the job's RQ entry on the queue (RQ job id = our job id), on `pipeline` when given (a transaction
    in MULTI mode: the commands are queued on it, the caller executes it)."""
    Queue(settings.queue_name, connection=r).enqueue_call(
        WORKER_FUNCTION,
        args=(payload.model_dump(mode="json"),),
        job_id=payload.job_id,
        timeout=run_limit(settings, payload.timeout_seconds) + settings.rq_timeout_margin_seconds,
        # RQ's copy holds the prompt: with BORA_STORE_PROMPT=false it goes as soon as the job has run.
        result_ttl=RQ_RESULT_TTL_SECONDS if settings.store_prompt else 0,
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
        timeout_seconds=record.timeout_seconds,
    )


def requeue(
    r: Redis, job_id: str, settings: Settings, *, token: str | None, actor: str, at_front: bool = True
) -> JobRecord:
    """running -> queued and back on the RQ queue (at the front: it has waited its turn once), in one
    MULTI/EXEC, fenced on the run `token` the caller saw. For a job whose worker died (the reaper) or is
    shutting down mid-job (the worker itself). Raises InvalidTransition when the job is not `running` (it
    finished, or is being canceled), RunSuperseded when another run owns it, JobNotFound when it is gone."""

    def enqueue_on(pipe: Pipeline, record: JobRecord) -> None:
        enqueue(r, settings, payload_of(record), pipeline=pipe, at_front=at_front)

    return jobstore.mark_requeued(
        r, job_id, prefix=settings.key_prefix, token=token, actor=actor, enqueue=enqueue_on,
        deadline_seconds=queued_deadline(settings, None),
    )


def restore_entry(r: Redis, record: JobRecord, settings: Settings) -> bool:
    """Put a `queued` job that has no RQ queue entry back at the front of the queue (its worker died between
    dequeue and start). WATCHes the job and the queue: nothing happens if either changed. True when done."""
    keys = jobstore.Keys(settings.key_prefix)
    with r.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.job(record.id), keys.rq_queue)
            status = pipe.hget(keys.job(record.id), "status")
            if status not in (b"queued", "queued") or pipe.lpos(keys.rq_queue, record.id) is not None:
                return False
            pipe.multi()
            enqueue(r, settings, payload_of(record), pipeline=pipe, at_front=True)
            pipe.hset(keys.job(record.id), "updated_at", utcnow().isoformat())
            pipe.execute()
            return True
        except WatchError:
            return False  # it changed meanwhile: the next pass looks again


