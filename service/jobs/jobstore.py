"""The one module that writes job state to Redis. Every transition is one Lua script or one MULTI/EXEC.

House rule 6 (one writer of job state) as it stands: every status transition goes through this module, one
transaction each. Its callers are the API for create and cancel (a queued job must become `canceled` at once,
not when a worker gets to it), the reapers (service/jobs/reaper.py) for the jobs of dead workers, and the worker's
lifecycle (worker/lifecycle.py) for everything else. A transition that puts a job on the RQ queue writes the
RQ entry in the same MULTI/EXEC (`create(pipeline=...)`, `mark_requeued(enqueue=...)`; see service/jobs/queueing.py).

Data model (P = settings.key_prefix):
  P:job:{id}            HASH, one field per top-level `JobRecord` attribute; nested values as JSON.
                        TTL = retention, set at create and refreshed on the terminal transition.
  P:jobs                ZSET id -> created_at (unix seconds); listing newest first.
  P:tenant:{t}:jobs     ZSET, the same per tenant.
  P:stats:finished      HASH "status:code" -> count, bumped by each terminal transition.
  P:stats:durations     LIST of recent successful `total_s` (newest first, 50 kept), for queue ETAs.
  rq:queue:{P}-videos   RQ's queue; RQ job id == our job id.

Allowed transitions:
  queued    -> running (mark_running) | canceled (request_cancel / mark_canceled) | failed (mark_failed)
  running   -> canceling (request_cancel) | succeeded | failed | canceled | queued (mark_requeued)
  canceling -> succeeded | failed | canceled   (never back to queued: the client asked it to stop)
A transition that is not allowed raises `InvalidTransition`; an unknown (or expired) id raises `JobNotFound`.
Every function takes the Redis client first and the key prefix as the keyword `prefix`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from service.jobs.errors import InvalidRequest, InvalidTransition, JobNotFound
from service.jobs.schemas import (
    JobError,
    JobRecord,
    JobStatus,
    JobWarning,
    Outputs,
    Stage,
    Timings,
    utcnow,
)

# Fields stored as JSON in the job hash; every other field is a plain string.
JSON_FIELDS = frozenset({"input", "outputs", "error", "timings", "warnings", "metadata", "webhook"})
DURATIONS_KEPT = 50


@dataclass(frozen=True)
class Keys:
    """Every Redis key the service and worker use, derived from one prefix."""

    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def stats_finished(self) -> str:
        return f"{self.prefix}:stats:finished"

    @property
    def stats_durations(self) -> str:
        return f"{self.prefix}:stats:durations"

    @property
    def queue_name(self) -> str:
        return queue_name(self.prefix)

    @property
    def rq_queue(self) -> str:
        return f"rq:queue:{self.queue_name}"


def queue_name(prefix: str) -> str:
    """RQ queue name for our video jobs."""
    return f"{prefix}-videos"


JOB_ID = re.compile(r"vid_[0-9a-f]{32}")


def new_job_id() -> str:
    """`vid_` + 32 hex characters (JOB_ID); also the RQ job id."""
    return "vid_" + secrets.token_hex(16)


# --- encoding -----------------------------------------------------------------------------------------


def _encode_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def encode(record: JobRecord) -> dict[Any, Any]:
    """JobRecord -> hash fields (None values are left out)."""
    data = record.model_dump(mode="json", exclude_none=True)
    return {name: _encode_value(value) for name, value in data.items()}


def decode(fields: dict[str, str]) -> JobRecord:
    """Hash fields -> JobRecord."""
    data: dict[str, Any] = {}
    for name, raw in fields.items():
        data[name] = json.loads(raw) if name in JSON_FIELDS else raw
    return JobRecord.model_validate(data)


# --- transitions --------------------------------------------------------------------------------------

# ARGV[1] is a JSON spec: {allowed: [status...], status: new|"", set: {field: str}, del: [field...],
# incr: {field: n}, stat: "status:code"|"", ttl: bool, push: "value"|""}. KEYS: job, stats, durations.
# Every applied transition bumps the hash's `version` (the job's change counter: live event ids).
# Returns {1, previous_status} when applied, {0, current_status} when not allowed, {-1, ""} when missing.
_TRANSITION_LUA = """
local spec = cjson.decode(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
local allowed = false
for _, s in ipairs(spec['allowed']) do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
redis.call('HINCRBY', KEYS[1], 'version', 1)
if spec['status'] ~= '' then redis.call('HSET', KEYS[1], 'status', spec['status']) end
for k, v in pairs(spec['set']) do redis.call('HSET', KEYS[1], k, v) end
for _, k in ipairs(spec['del']) do redis.call('HDEL', KEYS[1], k) end
for k, n in pairs(spec['incr']) do redis.call('HINCRBY', KEYS[1], k, n) end
if spec['stat'] ~= '' then redis.call('HINCRBY', KEYS[2], spec['stat'], 1) end
if spec['push'] ~= '' then
  redis.call('LPUSH', KEYS[3], spec['push'])
  redis.call('LTRIM', KEYS[3], 0, tonumber(spec['keep']) - 1)
end
if spec['ttl'] then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'retention_s') or '604800')
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {1, cur}
"""


def _spec(
    *,
    allowed: Iterable[JobStatus],
    status: JobStatus | None = None,
    set_fields: dict[str, Any] | None = None,
    del_fields: Sequence[str] = (),
    incr: dict[str, int] | None = None,
    stat: str = "",
    ttl: bool = False,
    push: str = "",
) -> dict[str, Any]:
    """The JSON argument of `_TRANSITION_LUA`."""
    return {
        "allowed": [s.value for s in allowed],
        "status": status.value if status else "",
        "set": {k: _encode_value(v) for k, v in (set_fields or {}).items() if v is not None},
        # cjson turns an empty Lua table into an object; keep lists non-empty-safe by always iterating ipairs.
        "del": list(del_fields) + [k for k, v in (set_fields or {}).items() if v is None],
        "incr": incr or {},
        "stat": stat,
        "ttl": ttl,
        "push": push,
        "keep": DURATIONS_KEPT,
    }


def _transition(r: Redis, job_id: str, *, prefix: str, **change: Any) -> tuple[int, str]:
    """Apply one `_spec(**change)` to the job in one Lua call; returns (code, status before)."""
    keys = Keys(prefix)
    spec = _spec(**change)
    script = r.register_script(_TRANSITION_LUA)
    code, current = script(
        keys=[keys.job(job_id), keys.stats_finished, keys.stats_durations], args=[json.dumps(spec)]
    )
    current = current.decode() if isinstance(current, bytes) else current
    return int(code), current


def _apply(r: Redis, job_id: str, target: JobStatus, *, prefix: str, **kwargs: Any) -> None:
    code, current = _transition(r, job_id, prefix=prefix, status=target, **kwargs)
    if code == -1:
        raise JobNotFound(f"no job {job_id}", param="id")
    if code == 0:
        raise InvalidTransition(job_id, current, target.value)


def _now() -> str:
    return utcnow().isoformat()


def create(
    r: Redis,
    job: JobRecord,
    *,
    prefix: str,
    retention_seconds: int | None = None,
    pipeline: Pipeline | None = None,
) -> JobRecord:
    """Store a new job (status queued) and index it; one MULTI/EXEC. Returns the stored record.

    With `pipeline` (a transaction), the commands are only queued on it: the API enqueues the RQ job on the
    same pipeline, so the record and the queue entry appear together or not at all."""
    keys = Keys(prefix)
    if retention_seconds is not None:
        job = job.model_copy(update={"retention_s": retention_seconds})
    created = job.created_at.timestamp()
    pipe = pipeline if pipeline is not None else r.pipeline(transaction=True)
    pipe.hset(keys.job(job.id), mapping=encode(job))
    pipe.expire(keys.job(job.id), job.retention_s)
    pipe.zadd(keys.jobs, {job.id: created})
    pipe.zremrangebyscore(keys.jobs, "-inf", f"({time.time() - job.retention_s}")
    if job.tenant:
        pipe.zadd(keys.tenant_jobs(job.tenant), {job.id: created})
        pipe.zremrangebyscore(keys.tenant_jobs(job.tenant), "-inf", f"({time.time() - job.retention_s}")
    if pipeline is None:
        pipe.execute()
    return job


def get(r: Redis, job_id: str, *, prefix: str) -> JobRecord | None:
    """The job, or None. While queued it carries `queue_position` (1 = next) and a rough `eta_seconds`."""
    keys = Keys(prefix)
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.job(job_id))
    queue_info_commands(pipe, job_id, prefix=prefix)
    fields, position, durations = pipe.execute()
    if not fields:
        return None
    return with_queue_info(decode(_strings(fields)), position, durations)


def queue_info_commands(pipe: Pipeline, job_id: str, *, prefix: str) -> None:
    """Queue the two reads `with_queue_info` needs (LPOS in the RQ queue, recent durations) on `pipe`."""
    keys = Keys(prefix)
    pipe.lpos(keys.rq_queue, job_id)
    pipe.lrange(keys.stats_durations, 0, DURATIONS_KEPT - 1)


def with_queue_info(record: JobRecord, position: Any, durations: Sequence[Any]) -> JobRecord:
    """A queued record with `queue_position` (1 = next) and a rough `eta_seconds`: position × the mean
    duration of recent successful jobs."""
    if record.status != JobStatus.queued or position is None:
        return record
    update: dict[str, Any] = {"queue_position": int(position) + 1}
    recent = [float(d) for d in durations]
    if recent:
        update["eta_seconds"] = round((int(position) + 1) * sum(recent) / len(recent), 1)
    return record.model_copy(update=update)


def list_jobs(
    r: Redis,
    limit: int,
    cursor: str | None = None,
    tenant: str | None = None,
    *,
    prefix: str,
) -> tuple[list[JobRecord], str | None]:
    """Newest first, `limit` per page. Returns (jobs, next_cursor); next_cursor is None on the last page.

    The cursor is opaque to clients ("<created_at>_<id>"); ids whose hash expired are dropped from the index.
    """
    keys = Keys(prefix)
    index = keys.tenant_jobs(tenant) if tenant else keys.jobs
    max_score: str | float = "+inf"
    after_id: str | None = None
    if cursor:
        try:
            score_text, after_id = cursor.split("_", 1)
            max_score = float(score_text)
            if not math.isfinite(max_score) or not JOB_ID.fullmatch(after_id):
                raise ValueError(cursor)
        except ValueError:
            raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor", param="cursor") from None
    found: list[JobRecord] = []
    offset = 0
    batch = limit + 1
    while len(found) <= limit:
        members: list[Any] = r.zrevrangebyscore(  # type: ignore[assignment]
            index, max_score, "-inf", start=offset, num=batch, withscores=True
        )
        if not members:
            break
        offset += len(members)
        candidates: list[str] = []
        for member, score in members:
            member_id = member.decode() if isinstance(member, bytes) else member
            if after_id is not None and score == max_score and member_id >= after_id:
                continue  # already served on an earlier page (ties order by member, descending)
            candidates.append(member_id)
        pipe = r.pipeline(transaction=False)
        for member_id in candidates:
            pipe.hgetall(keys.job(member_id))
        expired = []
        for member_id, fields in zip(candidates, pipe.execute(), strict=True):
            if not fields:
                expired.append(member_id)
                continue
            found.append(decode(_strings(fields)))
        if expired:
            r.zrem(index, *expired)
            offset -= len(expired)
    page = found[:limit]
    next_cursor = None
    if len(found) > limit and page:
        last = page[-1]
        next_cursor = f"{last.created_at.timestamp()!r}_{last.id}"
    return page, next_cursor


def mark_running(
    r: Redis,
    job_id: str,
    worker_id: str,
    *,
    prefix: str,
    weights_sha256: str | None = None,
    stage: Stage = Stage.loading,
) -> JobRecord:
    """queued -> running. Raises InvalidTransition when the job was canceled (or taken) meanwhile."""
    now = _now()
    _apply(
        r,
        job_id,
        JobStatus.running,
        prefix=prefix,
        allowed=[JobStatus.queued],
        set_fields={
            "worker_id": worker_id,
            "started_at": now,
            "updated_at": now,
            "stage": stage.value,
            "weights_sha256": weights_sha256,
        },
        del_fields=["eta_seconds"],
        incr={"attempts": 1},
    )
    return _must_get(r, job_id, prefix=prefix)


def update_progress(
    r: Redis,
    job_id: str,
    stage: Stage,
    step: int | None = None,
    total_steps: int | None = None,
    progress: float | None = None,
    eta_seconds: float | None = None,
    *,
    prefix: str,
) -> JobStatus | None:
    """Record progress of a running job (one cheap script call). Returns the job's current status, so the
    same call is the worker's cancel poll: `canceling` means stop between steps. A job that is no longer
    running/canceling is left untouched; None means the job does not exist."""
    set_fields: dict[str, Any] = {"stage": stage.value, "updated_at": _now()}
    if step is not None:
        set_fields["step"] = step
    if total_steps is not None:
        set_fields["total_steps"] = total_steps
    if progress is not None:
        set_fields["progress"] = round(min(max(float(progress), 0.0), 100.0), 2)
    if eta_seconds is not None:
        set_fields["eta_seconds"] = round(float(eta_seconds), 1)
    code, current = _transition(
        r, job_id, prefix=prefix, allowed=[JobStatus.running, JobStatus.canceling], set_fields=set_fields
    )
    return None if code == -1 else JobStatus(current)


def add_warnings(r: Redis, job_id: str, warnings: Sequence[JobWarning | dict[str, Any]], *, prefix: str) -> None:
    """Append warnings (e.g. prompt_truncated) to a job; optimistic WATCH/MULTI/EXEC."""
    new = [JobWarning.model_validate(w).model_dump(mode="json", exclude_none=True) for w in warnings]
    if not new:
        return
    key = Keys(prefix).job(job_id)

    def append(pipe: Any) -> None:
        raw = pipe.hget(key, "warnings")
        if not pipe.exists(key):
            raise JobNotFound(f"no job {job_id}", param="id")
        current = json.loads(raw) if raw else []
        pipe.multi()
        pipe.hset(key, "warnings", _encode_value(list(current or []) + new))

    r.transaction(append, key)


def mark_succeeded(r: Redis, job_id: str, outputs: Outputs, timings: Timings, *, prefix: str) -> JobRecord:
    """running|canceling -> succeeded, only after every output object is fully written."""
    now = _now()
    _apply(
        r,
        job_id,
        JobStatus.succeeded,
        prefix=prefix,
        allowed=[JobStatus.running, JobStatus.canceling],
        set_fields={
            "outputs": outputs.model_dump(mode="json", exclude_none=True),
            "timings": timings.model_dump(mode="json", exclude_none=True),
            "progress": 100,
            "completed_at": now,
            "updated_at": now,
        },
        del_fields=["eta_seconds"],
        stat=f"{JobStatus.succeeded.value}:",
        ttl=True,
        push=str(timings.total_s) if timings.total_s is not None else "",
    )
    return _must_get(r, job_id, prefix=prefix)


def mark_failed(
    r: Redis,
    job_id: str,
    code: str,
    message: str,
    retryable: bool = False,
    *,
    prefix: str,
    timings: Timings | None = None,
) -> JobRecord:
    """queued|running|canceling -> failed with an error code (schemas.ErrorCode)."""
    error = JobError(code=code, message=message, retryable=retryable)  # type: ignore[arg-type]
    now = _now()
    _apply(
        r,
        job_id,
        JobStatus.failed,
        prefix=prefix,
        allowed=[JobStatus.queued, JobStatus.running, JobStatus.canceling],
        set_fields={
            "error": error.model_dump(mode="json"),
            "timings": timings.model_dump(mode="json", exclude_none=True) if timings else None,
            "completed_at": now,
            "updated_at": now,
        },
        del_fields=["eta_seconds"],
        stat=f"{JobStatus.failed.value}:{error.code.value}",
        ttl=True,
    )
    return _must_get(r, job_id, prefix=prefix)


def _cancel_fields() -> dict[str, Any]:
    now = _now()
    error = JobError(code="canceled", message="canceled at the client's request", retryable=False)  # type: ignore[arg-type]
    return {"error": error.model_dump(mode="json"), "completed_at": now, "updated_at": now}


def mark_canceled(r: Redis, job_id: str, *, prefix: str) -> JobRecord:
    """queued|running|canceling -> canceled (the worker calls this after stopping between steps)."""
    _apply(
        r,
        job_id,
        JobStatus.canceled,
        prefix=prefix,
        allowed=[JobStatus.queued, JobStatus.running, JobStatus.canceling],
        set_fields=_cancel_fields(),
        del_fields=["eta_seconds"],
        stat=f"{JobStatus.canceled.value}:canceled",
        ttl=True,
    )
    return _must_get(r, job_id, prefix=prefix)


def request_cancel(r: Redis, job_id: str, *, prefix: str) -> JobRecord:
    """A client's cancel: queued -> canceled at once; running -> canceling (the worker stops between steps);
    canceling stays; a terminal job raises InvalidTransition (HTTP 409). The caller removes the RQ job."""
    code, current = _transition(
        r,
        job_id,
        prefix=prefix,
        allowed=[JobStatus.queued],
        status=JobStatus.canceled,
        set_fields=_cancel_fields(),
        del_fields=["eta_seconds"],
        stat=f"{JobStatus.canceled.value}:canceled",
        ttl=True,
    )
    if code == -1:
        raise JobNotFound(f"no job {job_id}", param="id")
    if code == 0 and current == JobStatus.running.value:
        code, current = _transition(
            r,
            job_id,
            prefix=prefix,
            allowed=[JobStatus.running],
            status=JobStatus.canceling,
            set_fields={"updated_at": _now()},
        )
    if code == 0 and current != JobStatus.canceling.value:
        raise InvalidTransition(
            job_id,
            current,
            JobStatus.canceled.value,
            message=f"job {job_id} already finished ({current}); only queued or running jobs can be canceled",
        )
    return _must_get(r, job_id, prefix=prefix)


def mark_requeued(
    r: Redis, job_id: str, *, prefix: str, enqueue: Callable[[Pipeline, JobRecord], None] | None = None
) -> JobRecord:
    """running -> queued (worker lost or shut down mid-job). `attempts` keeps counting, so the caller can give
    up after N with mark_failed(worker_lost). A `canceling` job is not re-queued (it should end `canceled`).

    `enqueue(pipe, record)` queues the job's RQ entry on the same MULTI/EXEC (service/jobs/queueing.py): the job is
    queued in both places or in neither. The job hash is WATCHed meanwhile, so a concurrent change retries."""
    keys = Keys(prefix)
    key = keys.job(job_id)
    spec = _spec(
        allowed=[JobStatus.running],
        status=JobStatus.queued,
        set_fields={"stage": Stage.queued.value, "progress": 0, "updated_at": _now()},
        del_fields=["worker_id", "started_at", "step", "total_steps", "eta_seconds"],
    )
    script = r.register_script(_TRANSITION_LUA)

    def transition(pipe: Pipeline) -> None:
        fields = _strings(pipe.hgetall(key))  # immediate: the pipe is WATCHing, not yet in MULTI
        if not fields:
            raise JobNotFound(f"no job {job_id}", param="id")
        if fields["status"] != JobStatus.running.value:
            raise InvalidTransition(job_id, fields["status"], JobStatus.queued.value)
        pipe.multi()
        script(keys=[key, keys.stats_finished, keys.stats_durations], args=[json.dumps(spec)], client=pipe)
        if enqueue is not None:
            enqueue(pipe, decode(fields))

    r.transaction(transition, key)
    return _must_get(r, job_id, prefix=prefix)


def finished_counts(r: Redis, *, prefix: str) -> dict[tuple[str, str], int]:
    """{(status, code): count} of terminal transitions so far (for bora_jobs_finished_total)."""
    raw = r.hgetall(Keys(prefix).stats_finished)
    counts: dict[tuple[str, str], int] = {}
    for field, value in _strings(raw).items():
        status, _, code = field.partition(":")
        counts[(status, code)] = int(value)
    return counts


def _must_get(r: Redis, job_id: str, *, prefix: str) -> JobRecord:
    record = get(r, job_id, prefix=prefix)
    if record is None:
        raise JobNotFound(f"no job {job_id}", param="id")
    return record


def _strings(fields: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
