"""The RQ side of a video job: the function a worker runs, the options it is enqueued with, and re-queueing.

A job's RQ entry is written in the same transaction as the job state that says it is queued: at creation
(`jobstore.create(rq_entry=...)`: RQ's job hash as RQ builds it, written by the create script, so a
submission is one round trip) and when a job goes back to the queue (`requeue`: `jobstore.mark_requeued`
and `enqueue`), so a crash between the two writes cannot leave a job `queued` in its hash but absent from RQ.
A job whose RQ entry was lost anyway (its worker died between dequeue and start) is put back by
`restore_entry` (the reaper).

Timeouts: the worker stops a job at its own limit (the job's `timeout_seconds`, at most
BORA_JOB_TIMEOUT_SECONDS) between steps and fails it `timeout`; RQ's hard kill is set
BORA_RQ_TIMEOUT_MARGIN_SECONDS later, as a last resort that the clean path always beats.
"""

from __future__ import annotations

from datetime import datetime

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job

from service.jobs import jobstore
from service.jobs.config import Settings
from service.jobs.schemas import JobPayload, JobRecord, JobStatus, utcnow

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


def rq_entry(queue: Queue, settings: Settings, payload: JobPayload) -> jobstore.RqEntry:
    """The RQ entry `enqueue` would write for a new job, for `jobstore.create` to write in its own script: RQ's
    own code builds the job hash (`create_job`, then what `enqueue_job` sets before saving), so its format is
    RQ's exactly; the script pushes the id at the back of `queue`. `queue` is the process's long-lived Queue:
    it asks Redis for its version once, not per job."""
    job = queue.create_job(
        WORKER_FUNCTION,
        args=(payload.model_dump(mode="json"),),
        job_id=payload.job_id,
        timeout=run_limit(settings, payload.timeout_seconds) + settings.rq_timeout_margin_seconds,
        result_ttl=RQ_RESULT_TTL_SECONDS,
        failure_ttl=settings.rq_failure_ttl_seconds,
        description=f"video {payload.job_id}",
    )
    queue._prepare_for_queue(job)  # origin, enqueued_at, timeout, status: what Queue.enqueue_job sets
    return jobstore.RqEntry(queue.key, job.key, job.to_dict())


def payload_of(record: JobRecord, enqueued_at: datetime | None = None) -> JobPayload:
    """The worker's payload for a stored job (what the API enqueued when it was created)."""
    return JobPayload(
        job_id=record.id,
        input=record.input,
        seed=record.seed,
        model=record.model,
        request_id=record.request_id,
        tenant=record.tenant,
        metadata=record.metadata,
        enqueued_at=enqueued_at or utcnow(),
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




CLAIM_WINDOW = 100  # how far down the queue a worker looks for jobs to batch with the one it took

# Take one entry off RQ's queue, and its RQ job hash with it, only if it is still there (another worker may
# have dequeued it meanwhile). KEYS: queue list, RQ job hash; ARGV: job id.
_CLAIM_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""


def batch_key(payload: JobPayload) -> tuple[object, ...]:
    """Jobs with equal keys can share one pipeline call: same model, shape, steps, sampler and guidance.
    Prompt, seed and fps may differ (each sample has its own generator; fps only matters to the MP4)."""
    inp = payload.input
    return (payload.model, inp.num_frames, inp.height, inp.width, inp.num_inference_steps, inp.sampler,
            inp.guidance_scale)


def claim_batch(r: Redis, settings: Settings, first: JobPayload, limit: int) -> list[JobPayload]:
    """Take up to `limit` queued jobs that can run in one batch with `first` off the RQ queue, oldest first
    within the first CLAIM_WINDOW entries. A job is claimed only if its run-time limit is within `first`'s
    (RQ's hard kill of `first`'s execution bounds the whole batch).

    Each claim removes the job's queue entry and RQ job hash in one script, so two workers never claim the same
    job. The caller then starts each claimed job (`jobstore.mark_running`, its own run token): from then on the
    reaper recovers it like any running job if this worker dies. A worker dying between claim and start
    leaves the job `queued` with no queue entry, which the reaper puts back (`restore_entry`)."""
    if limit < 1:
        return []
    keys = jobstore.Keys(settings.key_prefix)
    ids = [_text(i) for i in r.lrange(keys.rq_queue, 0, CLAIM_WINDOW - 1)]  # type: ignore[union-attr]
    ids = [job_id for job_id in ids if job_id != first.job_id]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(keys.job(job_id))
    wanted, first_limit = batch_key(first), run_limit(settings, first.timeout_seconds)
    claim = r.register_script(_CLAIM_LUA)
    claimed: list[JobPayload] = []
    for job_id, fields in zip(ids, pipe.execute(), strict=True):
        if len(claimed) == limit:
            break
        if not fields:
            continue
        record = jobstore.decode(jobstore.strings(fields))
        if record.status != JobStatus.queued:
            continue
        payload = payload_of(record, enqueued_at=record.updated_at or record.created_at)
        if batch_key(payload) != wanted or run_limit(settings, payload.timeout_seconds) > first_limit:
            continue
        if claim(keys=[keys.rq_queue, Job.key_for(job_id)], args=[job_id]):
            claimed.append(payload)
    return claimed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
