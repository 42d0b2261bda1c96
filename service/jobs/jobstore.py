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
  P:queued              HASH tenant -> jobs queued (the per-tenant cap, service/jobs/admission.py), moved by
                        one by every transition into or out of `queued`, in the transition's own script.
  P:rate:{t}            STRING, the tenant's submission token bucket (service/jobs/admission.py).
  P:stats:finished      HASH "status:code" -> count, bumped by each terminal transition.
  P:stats:durations     LIST of recent successful `total_s` (newest first, 50 kept), for queue ETAs.
  P:stats:retention     HASH objects|jobs -> count deleted by the retention sweeper (service/jobs/retention.py).
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
from redis.asyncio import Redis as AsyncRedis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from service.jobs import admission, webhooks
from service.jobs.errors import (
    Conflict,
    InvalidRequest,
    InvalidTransition,
    JobExpired,
    JobNotFound,
    RunSuperseded,
)
from service.jobs.schemas import (
    JobError,
    JobRecord,
    JobStatus,
    JobWarning,
    Outputs,
    Stage,
    Timings,
    VideoInput,
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
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def orphans(self) -> str:
        return f"{self.prefix}:storage:orphans"

    @property
    def queued_counts(self) -> str:
        return f"{self.prefix}:queued"

    def rate(self, tenant: str) -> str:
        return f"{self.prefix}:rate:{tenant}"

    @property
    def stats_finished(self) -> str:
        return f"{self.prefix}:stats:finished"

    @property
    def stats_durations(self) -> str:
        return f"{self.prefix}:stats:durations"

    @property
    def stats_retention(self) -> str:
        return f"{self.prefix}:stats:retention"

    @property
    def retention_lock(self) -> str:
        return f"{self.prefix}:retention:sweep"

    @property
    def queue_name(self) -> str:
        return queue_name(self.prefix)

    @property
    def rq_queue(self) -> str:
        return f"rq:queue:{self.queue_name}"


def queue_name(prefix: str) -> str:
    """RQ queue name for our video jobs."""
    return f"{prefix}-videos"


RQ_QUEUES = "rq:queues"  # RQ's set of queue keys (rq.Queue.redis_queues_keys)
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

# Outcomes of a transition.
APPLIED, ALREADY, REFUSED, FENCED, MISSING = 1, 2, 0, -2, -1

# ARGV[1] is a JSON spec: {allowed: [status...], status: new|"", token: run token the job must hold|"",
# actor: who writes, set: {field: str}, del: [field...], incr: {field: n}, stat: "status:code"|"", ttl: bool,
# push: "value"|"", active: "remove"|"keep"|<deadline unix s>, adopt: [storage key...]}; ARGV[2] the job id.
# KEYS: job, stats, durations, active, orphans, queued counts. A status change into or out of `queued` moves
# the tenant's queued count by one (service/jobs/admission.py). A status change records its `actor` in the hash field
# `writer`, so the same actor repeating it (its reply was lost) gets ALREADY instead of a refusal.
# Returns {code, status before}; see the outcome constants above.
_TRANSITION_LUA = """
local spec = cjson.decode(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
if spec['token'] ~= '' and (redis.call('HGET', KEYS[1], 'run_token') or '') ~= spec['token'] then
  return {-2, cur}
end
if spec['status'] ~= '' and cur == spec['status'] and (redis.call('HGET', KEYS[1], 'writer') or '') == spec['actor'] then
  return {2, cur}
end
local allowed = false
for _, s in ipairs(spec['allowed']) do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
redis.call('HINCRBY', KEYS[1], 'version', 1)
if spec['status'] ~= '' then
  redis.call('HSET', KEYS[1], 'status', spec['status'], 'writer', spec['actor'])
  if (cur == 'queued') ~= (spec['status'] == 'queued') then
    redis.call('HINCRBY', KEYS[6], redis.call('HGET', KEYS[1], 'tenant') or '', cur == 'queued' and -1 or 1)
  end
end
for k, v in pairs(spec['set']) do redis.call('HSET', KEYS[1], k, v) end
for _, k in ipairs(spec['del']) do redis.call('HDEL', KEYS[1], k) end
for k, n in pairs(spec['incr']) do redis.call('HINCRBY', KEYS[1], k, n) end
if spec['stat'] ~= '' then redis.call('HINCRBY', KEYS[2], spec['stat'], 1) end
if spec['push'] ~= '' then
  redis.call('LPUSH', KEYS[3], spec['push'])
  redis.call('LTRIM', KEYS[3], 0, tonumber(spec['keep']) - 1)
end
if spec['active'] == 'remove' then
  redis.call('ZREM', KEYS[4], ARGV[2])
elseif spec['active'] ~= 'keep' then
  redis.call('ZADD', KEYS[4], tonumber(spec['active']), ARGV[2])
end
for _, k in ipairs(spec['adopt']) do redis.call('HDEL', KEYS[5], k) end
if spec['ttl'] then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'retention_s') or '604800')
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {1, cur}
"""

# queued -> running. ARGV: worker id, now (ISO), now (unix s), run deadline (unix s), weights sha256|"", stage,
# job id. KEYS: job, active, queued counts. The run token is `{worker id}:{attempt}`, attempt counted here. The
# same worker asking again (its reply was lost) gets ALREADY with its token: a worker process runs a job at
# most once at a time (alone or in a batch of distinct jobs), so a job running under its id is this very run.
# Returns {code, status before, token}; code -3: the job expired while queued.
_START_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, '', ''} end
local token = redis.call('HGET', KEYS[1], 'run_token') or ''
if cur ~= 'queued' then
  local mine = ARGV[1] .. ':'
  if (cur == 'running' or cur == 'canceling') and string.sub(token, 1, #mine) == mine then return {2, cur, token} end
  return {0, cur, token}
end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_unix') or '0')
if expires > 0 and tonumber(ARGV[3]) > expires then return {-3, cur, ''} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
token = ARGV[1] .. ':' .. attempt
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'writer', token, 'run_token', token, 'worker_id', ARGV[1],
  'started_at', ARGV[2], 'updated_at', ARGV[2], 'stage', ARGV[6])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'weights_sha256', ARGV[5]) end
redis.call('HDEL', KEYS[1], 'eta_seconds')
redis.call('HINCRBY', KEYS[3], redis.call('HGET', KEYS[1], 'tenant') or '', -1)
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[7]) end
return {1, cur, token}
"""
EXPIRED = -3
WATCH_ATTEMPTS = 5


def _spec(
    *,
    allowed: Iterable[JobStatus],
    status: JobStatus | None = None,
    token: str | None = None,
    actor: str = "",
    set_fields: dict[str, Any] | None = None,
    del_fields: Sequence[str] = (),
    incr: dict[str, int] | None = None,
    stat: str = "",
    ttl: bool = False,
    push: str = "",
    active: str | float = "keep",
    adopt: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON argument of `_TRANSITION_LUA`. A terminal `status` also drops the job from the active set."""
    if status is not None and status.terminal:
        active = "remove"
    return {
        "allowed": [s.value for s in allowed],
        "status": status.value if status else "",
        "token": token or "",
        "actor": actor,
        "set": {k: _encode_value(v) for k, v in (set_fields or {}).items() if v is not None},
        # cjson turns an empty Lua table into an object; keep lists non-empty-safe by always iterating ipairs.
        "del": list(del_fields) + [k for k, v in (set_fields or {}).items() if v is None],
        "incr": incr or {},
        "stat": stat,
        "ttl": ttl,
        "push": push,
        "keep": DURATIONS_KEPT,
        "active": str(active),
        "adopt": list(adopt),
    }


def _script_keys(keys: Keys, job_id: str) -> list[str]:
    return [keys.job(job_id), keys.stats_finished, keys.stats_durations, keys.active, keys.orphans,
            keys.queued_counts]


def _transition(r: Redis, job_id: str, *, prefix: str, **change: Any) -> tuple[int, str]:
    """Apply one `_spec(**change)` to the job in one Lua call; returns (outcome, status before)."""
    keys = Keys(prefix)
    script = r.register_script(_TRANSITION_LUA)
    code, current = script(keys=_script_keys(keys, job_id), args=[json.dumps(_spec(**change)), job_id])
    current = current.decode() if isinstance(current, bytes) else current
    return int(code), current


def _decide(fields: dict[str, str], spec: dict[str, Any]) -> int:
    """What `_TRANSITION_LUA` will answer for `spec` on a job hash read under WATCH (the same rules)."""
    if not fields:
        return MISSING
    if spec["token"] and fields.get("run_token", "") != spec["token"]:
        return FENCED
    if spec["status"] and fields["status"] == spec["status"] and fields.get("writer", "") == spec["actor"]:
        return ALREADY
    return APPLIED if fields["status"] in spec["allowed"] else REFUSED


def _after(fields: dict[str, str], spec: dict[str, Any]) -> JobRecord:
    """The record as `spec` leaves it (what a webhook queued in the same transaction describes)."""
    new = {k: v for k, v in fields.items() if k not in spec["del"]}
    new.update(spec["set"])
    for k, n in spec["incr"].items():
        new[k] = str(int(new.get(k, "0")) + n)
    if spec["status"]:
        new["status"] = spec["status"]
    new["version"] = str(int(fields.get("version", "0")) + 1)
    return decode(new)


def _raise_for(code: int, job_id: str, current: str, target: str) -> None:
    if code == MISSING:
        raise JobNotFound(f"no job {job_id}", param="id")
    if code == FENCED:
        raise RunSuperseded(job_id, current, target, message=f"job {job_id} ({current}) belongs to another run now")
    if code == REFUSED:
        raise InvalidTransition(job_id, current, target)


def _guarded(
    r: Redis,
    job_id: str,
    *,
    prefix: str,
    then: Callable[[Pipeline, JobRecord], None] | None = None,
    **change: Any,
) -> JobRecord:
    """Apply `_spec(**change)` and, in the same MULTI/EXEC, whatever `then(pipe, record_after)` queues (an RQ
    entry, a webhook): the side effects happen exactly when the transition does. The job hash is WATCHed
    between the read and EXEC. A lost reply is safe: the retry reads the hash again and finds the
    transition ALREADY made by this actor. Returns the record after the transition; raises like `_apply`."""
    keys = Keys(prefix)
    key = keys.job(job_id)
    target = _spec(**change)["status"] or "updated"
    script = r.register_script(_TRANSITION_LUA)
    last: Exception | None = None
    for _ in range(WATCH_ATTEMPTS):
        with r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                fields = strings(pipe.hgetall(key))
                spec = _forget_prompt(fields, _spec(**change))
                code = _decide(fields, spec)
                _raise_for(code, job_id, fields.get("status", ""), target)
                after = _after(fields, spec)
                if code == ALREADY:
                    return decode(fields)
                pipe.multi()
                script(keys=_script_keys(keys, job_id), args=[json.dumps(spec), job_id], client=pipe)
                if then is not None:
                    then(pipe, after)
                pipe.execute()
                return after
            except WatchError as exc:  # changed meanwhile, or the connection dropped while watching
                last = exc
    raise RedisConnectionError(f"job {job_id}: transition to {target} not confirmed after {WATCH_ATTEMPTS} tries") from last


def _forget_prompt(fields: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    """`spec`, also replacing the prompt by its sha256 when it ends a job created with BORA_STORE_PROMPT=false
    (the worker needs the prompt until then). Every terminal transition comes through `_guarded`."""
    ends = bool(spec["status"]) and JobStatus(spec["status"]).terminal
    if not ends or fields.get("store_prompt", "True") != "False" or "input" not in fields:
        return spec
    forgotten = VideoInput.model_validate_json(fields["input"]).without_prompt()
    spec["set"]["input"] = _encode_value(forgotten.model_dump(mode="json"))
    return spec


def _apply(r: Redis, job_id: str, target: JobStatus, *, prefix: str, **kwargs: Any) -> None:
    code, current = _transition(r, job_id, prefix=prefix, status=target, **kwargs)
    _raise_for(code, job_id, current, target.value)


def _now() -> str:
    return utcnow().isoformat()


@dataclass(frozen=True)
class Claim:
    """An Idempotency-Key, written in the same transaction as the job it names (service/jobs/idempotency.py)."""

    key: str  # the Redis key
    body_sha256: str
    ttl: int


@dataclass(frozen=True)
class RqEntry:
    """A job's RQ entry as RQ itself would write it (service/jobs/queueing.py `rq_entry`): RQ's job hash, and
    the queue list its id is pushed onto."""

    queue_key: str
    job_key: str
    fields: dict[str, Any]


# One round trip per submission. KEYS: job, index, tenant index, active, queued counts, rate bucket, RQ queue,
# RQ job, RQ's set of queues, [claim]. ARGV: job id, tenant, now (unix s), created score, active score,
# retention s, rate/s, burst, tenant cap, global cap, the job hash as one JSON object (one argument to encode
# rather than fifty), [claim fingerprint, claim value, claim ttl, job key prefix], the RQ job hash items (none:
# no RQ entry, and no global cap).
# Order: a retry or a replay spends nothing; then the rate limit, the global cap (push, then pop again when
# over), the tenant cap (count, then uncount when over); then every write. Returns {outcome, detail}: 1 created
# (detail: queue position, 0 without RQ entry), 2 this very job exists (an earlier try committed), 3 replay
# (detail: the job id the claim names), 4 the claim names another body, or a refusal (service/jobs/admission.py).
_CREATE_LUA = """
local id, tenant, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rate, burst = tonumber(ARGV[7]), tonumber(ARGV[8])
local tenant_cap, global_cap = tonumber(ARGV[9]), tonumber(ARGV[10])
local rest = 12
if redis.call('EXISTS', KEYS[1]) == 1 then return {2, ''} end
if KEYS[10] then
  local held = redis.call('GET', KEYS[10])
  if held then
    local holder = cjson.decode(held)
    if holder['body_sha256'] ~= ARGV[rest] then return {4, ''} end
    if redis.call('EXISTS', ARGV[rest + 3] .. holder['job_id']) == 1 then return {3, holder['job_id']} end
  end
end
if rate > 0 then
  local tokens, updated = burst, now
  local state = redis.call('GET', KEYS[6])
  if state then
    local space = string.find(state, ' ')
    tokens, updated = tonumber(string.sub(state, 1, space - 1)), tonumber(string.sub(state, space + 1))
  end
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
  if tokens < 1 then return {5, tostring((1 - tokens) / rate)} end
  tokens = tokens - 1
  redis.call('SET', KEYS[6], tostring(tokens) .. ' ' .. tostring(now), 'PX', math.ceil((burst - tokens) / rate * 1000) + 1000)
end
local enqueue = #ARGV >= rest + (KEYS[10] and 4 or 0)
local position = 0
if enqueue then
  position = redis.call('RPUSH', KEYS[7], id)
  if global_cap > 0 and position > global_cap then
    redis.call('RPOP', KEYS[7])
    return {7, tostring(position - 1)}
  end
end
local queued = redis.call('HINCRBY', KEYS[5], tenant, 1)
if tenant_cap > 0 and queued > tenant_cap then
  redis.call('HINCRBY', KEYS[5], tenant, -1)
  if enqueue then redis.call('RPOP', KEYS[7]) end
  return {6, tostring(queued - 1)}
end
local job = {}
for field, value in pairs(cjson.decode(ARGV[11])) do job[#job + 1] = field; job[#job + 1] = value end
redis.call('HSET', KEYS[1], unpack(job))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[4], id)
if tenant ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], id) end
redis.call('ZADD', KEYS[4], ARGV[5], id)
if KEYS[10] then
  redis.call('SET', KEYS[10], ARGV[rest + 1], 'EX', ARGV[rest + 2])
  rest = rest + 4
end
if enqueue then
  redis.call('HSET', KEYS[8], unpack(ARGV, rest, #ARGV))
  if position == 1 then redis.call('SADD', KEYS[9], KEYS[7]) end  -- the queue list was just created
end
return {1, tostring(position)}
"""
CREATED, CREATED_BEFORE, REPLAY, CLAIM_CONFLICT = 1, 2, 3, 4


@dataclass(frozen=True)
class _Create:
    """One create script call: its keys and arguments, and what its answers mean."""

    job: JobRecord
    keys: list[str]
    args: list[Any]
    limits: admission.Limits

    @classmethod
    def of(
        cls,
        job: JobRecord,
        prefix: str,
        retention_seconds: int | None,
        rq_entry: RqEntry | None,
        claim: Claim | None,
        limits: admission.Limits | None,
        queued_expiry_seconds: float | None,
        deadline_seconds: float | None,
    ) -> _Create:
        keys = Keys(prefix)
        if retention_seconds is not None:
            job = job.model_copy(update={"retention_s": retention_seconds})
        created = job.created_at.timestamp()
        fields = encode(job)
        if queued_expiry_seconds is not None:
            fields["expires_unix"] = str(created + queued_expiry_seconds)
        tenant = job.tenant or ""
        script_keys = [
            keys.job(job.id), keys.jobs, keys.tenant_jobs(tenant), keys.active, keys.queued_counts,
            keys.rate(tenant), rq_entry.queue_key if rq_entry else keys.rq_queue, rq_entry.job_key if rq_entry else "",
            RQ_QUEUES,
        ]
        on = limits or admission.Limits(0, 1, 0, 0, 0)
        args: list[Any] = [
            job.id, tenant, time.time(), created, created + (deadline_seconds or job.retention_s), job.retention_s,
            on.rate_per_second, on.burst, on.max_queued_per_tenant, on.max_queued_total,
            json.dumps(fields, separators=(",", ":"), ensure_ascii=False),
        ]
        if claim is not None:
            script_keys.append(claim.key)
            value = json.dumps({"body_sha256": claim.body_sha256, "job_id": job.id, "claimed_at": time.time()})
            args += [claim.body_sha256, value, claim.ttl, keys.job("")]
        if rq_entry is not None:
            args += [item for pair in rq_entry.fields.items() for item in pair]
        return cls(job, script_keys, args, on)

    def settle(self, reply: Sequence[Any]) -> tuple[JobRecord | str, bool]:
        """(the new record, False); or (the id of the job to answer with, replayed) when the script found this
        job created by an earlier try, or the Idempotency-Key's job. Raises `Conflict` or `Refused`."""
        outcome, detail = int(reply[0]), reply[1]
        detail = detail.decode() if isinstance(detail, bytes) else detail
        if outcome == CREATED:
            position = int(detail)
            return (self.job.model_copy(update={"queue_position": position}) if position else self.job), False
        if outcome == CREATED_BEFORE:
            return self.job.id, False
        if outcome == REPLAY:
            return detail, True
        if outcome == CLAIM_CONFLICT:
            raise Conflict(
                "this Idempotency-Key was already used with another request body; use a new key for a new job",
                code="idempotency_key_reused",
                param="header.Idempotency-Key",
            )
        raise admission.refusal(outcome, detail, self.limits, self.job.tenant or "")


def create(
    r: Redis,
    job: JobRecord,
    *,
    prefix: str,
    retention_seconds: int | None = None,
    rq_entry: RqEntry | None = None,
    claim: Claim | None = None,
    limits: admission.Limits | None = None,
    queued_expiry_seconds: float | None = None,
    deadline_seconds: float | None = None,
) -> tuple[JobRecord, bool]:
    """Store a new job (status queued) and index it, count it as queued for its tenant, and write its
    Idempotency-Key claim and its RQ entry: one Lua script, one round trip, whose cost does not grow with the
    backlog. With `limits`, the rate limit and queue caps are checked first (`Refused` when over one).
    Returns (record, replayed); the record carries its `queue_position` when it was just enqueued.

    Safe to retry and to race: a retry after a lost reply finds the job it created (nothing is spent twice),
    and a request whose Idempotency-Key another request holds gets that request's job back (replayed=True) -
    or `Conflict` when it came with another body. `queued_expiry_seconds`: past it the job fails `expired`
    instead of starting; `deadline_seconds`: when it counts as overdue (the active set). The indexes are
    trimmed by the reaper (`trim_indexes`), not here. `create_async` is the same for an asyncio client."""
    call = _Create.of(job, prefix, retention_seconds, rq_entry, claim, limits, queued_expiry_seconds, deadline_seconds)
    script = r.register_script(_CREATE_LUA)
    for _ in range(2):  # a second time only when a replayed job vanished between the script and the read
        answer, replayed = call.settle(script(keys=call.keys, args=call.args))
        if isinstance(answer, JobRecord):
            return answer, False
        record = get(r, answer, prefix=prefix)
        if record is not None:
            return record, replayed
        if not replayed:  # created by an earlier try, and deleted since: never made again
            raise JobNotFound(f"no job {job.id}", param="id")
    raise JobNotFound(f"the job of this Idempotency-Key vanished twice while job {job.id} was created")


async def create_async(
    r: AsyncRedis,
    job: JobRecord,
    *,
    prefix: str,
    rq_entry: RqEntry | None = None,
    claim: Claim | None = None,
    limits: admission.Limits | None = None,
    queued_expiry_seconds: float | None = None,
    deadline_seconds: float | None = None,
) -> tuple[JobRecord, bool]:
    """`create` on an asyncio client (the API's submission route)."""
    call = _Create.of(job, prefix, None, rq_entry, claim, limits, queued_expiry_seconds, deadline_seconds)
    script = r.register_script(_CREATE_LUA)
    for _ in range(2):
        answer, replayed = call.settle(await script(keys=call.keys, args=call.args))
        if isinstance(answer, JobRecord):
            return answer, False
        record = await get_async(r, answer, prefix=prefix)
        if record is not None:
            return record, replayed
        if not replayed:  # created by an earlier try, and deleted since: never made again
            raise JobNotFound(f"no job {job.id}", param="id")
    raise JobNotFound(f"the job of this Idempotency-Key vanished twice while job {job.id} was created")


def queued_count(r: Redis, tenant: str, *, prefix: str) -> int:
    """The tenant's queued jobs, as the per-tenant cap counts them."""
    return int(r.hget(Keys(prefix).queued_counts, tenant) or 0)  # type: ignore[arg-type]


def trim_indexes(r: Redis, *, prefix: str, retention_seconds: float) -> int:
    """Drop ids older than the retention from the listing indexes (their hashes have expired); the reaper does
    this, so a submission does not pay for it. Returns how many were dropped."""
    keys = Keys(prefix)
    cutoff = f"({time.time() - retention_seconds}"
    indexes = [keys.jobs, *r.scan_iter(match=keys.tenant_jobs("*"), count=1000)]
    pipe = r.pipeline(transaction=False)
    for index in indexes:
        pipe.zremrangebyscore(index, "-inf", cutoff)
    return sum(pipe.execute())


# KEYS: job, RQ queue, durations. ARGV: job id, durations kept. The job hash as a flat list; for a queued job
# also its index in the RQ queue (-1: not in it) and the recent durations. LPOS scans the queue, so only a
# queued job pays for it.
_GET_LUA = """
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] == 'status' then
    if fields[i + 1] ~= 'queued' then break end
    local position = redis.call('LPOS', KEYS[2], ARGV[1]) or -1
    return {fields, position, redis.call('LRANGE', KEYS[3], 0, tonumber(ARGV[2]) - 1)}
  end
end
return {fields}
"""


def get(r: Redis, job_id: str, *, prefix: str) -> JobRecord | None:
    """The job, or None (one round trip). While queued it carries `queue_position` (1 = next) and a rough
    `eta_seconds`: position x the mean duration of recent successful jobs. `get_async`: the same, asyncio."""
    return _read(r.register_script(_GET_LUA)(keys=_get_keys(job_id, prefix), args=[job_id, DURATIONS_KEPT]))


async def get_async(r: AsyncRedis, job_id: str, *, prefix: str) -> JobRecord | None:
    script = r.register_script(_GET_LUA)
    return _read(await script(keys=_get_keys(job_id, prefix), args=[job_id, DURATIONS_KEPT]))


def _get_keys(job_id: str, prefix: str) -> list[str]:
    keys = Keys(prefix)
    return [keys.job(job_id), keys.rq_queue, keys.stats_durations]


def _read(reply: Sequence[Any]) -> JobRecord | None:
    """The record `_GET_LUA`'s reply describes."""
    flat = reply[0]
    if not flat:
        return None
    record = decode(strings(dict(zip(flat[::2], flat[1::2], strict=True))))
    if len(reply) == 1 or reply[1] < 0:
        return record
    position = int(reply[1]) + 1
    update: dict[str, Any] = {"queue_position": position}
    recent = [float(d) for d in reply[2]]
    if recent:
        update["eta_seconds"] = round(position * sum(recent) / len(recent), 1)
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
            found.append(decode(strings(fields)))
        if expired:
            r.zrem(index, *expired)
            offset -= len(expired)
    page = found[:limit]
    next_cursor = None
    if len(found) > limit and page:
        last = page[-1]
        next_cursor = f"{last.created_at.timestamp()!r}_{last.id}"
    return page, next_cursor


@dataclass(frozen=True)
class Run:
    """A job as a worker started it: the record and the token that fences every write of this run."""

    record: JobRecord
    token: str


def mark_running(
    r: Redis,
    job_id: str,
    worker_id: str,
    *,
    prefix: str,
    weights_sha256: str | None = None,
    stage: Stage = Stage.loading,
    deadline_seconds: float = 0.0,
) -> Run:
    """queued -> running under a new run token `{worker_id}:{attempt}`. Safe to repeat: the same worker gets
    its run back. Raises InvalidTransition when the job was canceled or taken meanwhile, `JobExpired` when it
    waited past its expiry (the caller fails it `expired`)."""
    keys = Keys(prefix)
    now = utcnow()
    script = r.register_script(_START_LUA)
    code, current, token = script(
        keys=[keys.job(job_id), keys.active, keys.queued_counts],
        args=[worker_id, now.isoformat(), now.timestamp(), now.timestamp() + deadline_seconds if deadline_seconds else "",
              weights_sha256 or "", stage.value, job_id],
    )
    current = current.decode() if isinstance(current, bytes) else current
    if code == EXPIRED:
        raise JobExpired(job_id, current, JobStatus.running.value, message=f"job {job_id} expired while queued")
    _raise_for(int(code), job_id, current, JobStatus.running.value)
    return Run(_must_get(r, job_id, prefix=prefix), token.decode() if isinstance(token, bytes) else token)


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
    token: str,
) -> JobStatus:
    """Record progress of this run (one cheap script call, safe to repeat). Returns the job's status, so the
    same call is the worker's cancel poll: `canceling` means stop between steps. Raises RunSuperseded when the
    job is no longer this run's (re-queued, taken over, ended by the reaper): the run must stop at once."""
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
        r, job_id, prefix=prefix, allowed=[JobStatus.running, JobStatus.canceling], token=token,
        set_fields=set_fields,
    )
    if code == REFUSED:
        code = FENCED  # ended or re-queued under this run: for the run, the same as taken over
    _raise_for(code, job_id, current, "updated")
    return JobStatus(current)


_ADD_WARNINGS_LUA = """
if (redis.call('HGET', KEYS[1], 'run_token') or '') ~= ARGV[1] then return 0 end
local raw = redis.call('HGET', KEYS[1], 'warnings')
local current = {}
if raw and raw ~= '' and raw ~= '[]' then current = cjson.decode(raw) end
local seen = {}
for _, w in ipairs(current) do seen[w['code']] = true end
for _, w in ipairs(cjson.decode(ARGV[2])) do
  if not seen[w['code']] then table.insert(current, w); seen[w['code']] = true end
end
redis.call('HSET', KEYS[1], 'warnings', cjson.encode(current))
return 1
"""


def add_warnings(
    r: Redis, job_id: str, warnings: Sequence[JobWarning | dict[str, Any]], *, prefix: str, token: str
) -> None:
    """Append warnings (e.g. prompt_truncated) a job does not have yet (by code: safe to repeat); fenced."""
    new = [JobWarning.model_validate(w).model_dump(mode="json", exclude_none=True) for w in warnings]
    if not new:
        return
    script = r.register_script(_ADD_WARNINGS_LUA)
    if not script(keys=[Keys(prefix).job(job_id)], args=[token, json.dumps(new)]):
        raise RunSuperseded(job_id, "?", "updated", message=f"job {job_id} belongs to another run now")


def _notify_on(r: Redis, prefix: str, event: str) -> Callable[[Pipeline, JobRecord], None]:
    """A `then` for `_guarded`: queue the job's webhook for `event` in the transition's transaction, so it is
    queued exactly once per transition."""

    def queue(pipe: Pipeline, record: JobRecord) -> None:
        webhooks.enqueue_event(r, record, event, prefix=prefix, pipeline=pipe)

    return queue


def mark_succeeded(
    r: Redis, job_id: str, outputs: Outputs, timings: Timings, *, prefix: str, token: str
) -> JobRecord:
    """running|canceling -> succeeded, only after every output object is fully written; the record points at
    this run's objects, which stop being orphan candidates in the same script (`adopt`). Fenced; safe to
    repeat; the `video.succeeded` webhook is queued in the same transaction."""
    now = _now()
    keys = [o.key for o in (outputs.video, outputs.thumbnail, outputs.sidecar) if o is not None]
    return _guarded(
        r,
        job_id,
        prefix=prefix,
        then=_notify_on(r, prefix, "video.succeeded"),
        status=JobStatus.succeeded,
        allowed=[JobStatus.running, JobStatus.canceling],
        token=token,
        actor=token,
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
        adopt=keys,
    )


def mark_failed(
    r: Redis,
    job_id: str,
    code: str,
    message: str,
    retryable: bool = False,
    *,
    prefix: str,
    token: str | None,
    actor: str,
    timings: Timings | None = None,
) -> JobRecord:
    """-> failed with an error code (schemas.ErrorCode), in one transaction with its `video.failed` webhook.
    With `token` (a run, or a reaper acting on the run it saw): running|canceling only, fenced. Without: a job
    that never started (queued), e.g. an invalid payload or an expired job. Safe to repeat by the same actor."""
    error = JobError(code=code, message=message, retryable=retryable)  # type: ignore[arg-type]
    now = _now()
    return _guarded(
        r,
        job_id,
        prefix=prefix,
        then=_notify_on(r, prefix, "video.failed"),
        status=JobStatus.failed,
        allowed=[JobStatus.running, JobStatus.canceling] if token else [JobStatus.queued],
        token=token,
        actor=actor,
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


def _cancel_fields() -> dict[str, Any]:
    now = _now()
    error = JobError(code="canceled", message="canceled at the client's request", retryable=False)  # type: ignore[arg-type]
    return {"error": error.model_dump(mode="json"), "completed_at": now, "updated_at": now}


def mark_canceled(r: Redis, job_id: str, *, prefix: str, token: str, actor: str) -> JobRecord:
    """running|canceling -> canceled: the run stopped between steps (or the reaper ends a cancel whose run is
    gone or stuck). Fenced on `token`; safe to repeat; the `video.canceled` webhook in the same transaction."""
    return _guarded(
        r,
        job_id,
        prefix=prefix,
        then=_notify_on(r, prefix, "video.canceled"),
        status=JobStatus.canceled,
        allowed=[JobStatus.running, JobStatus.canceling],
        token=token,
        actor=actor,
        set_fields=_cancel_fields(),
        del_fields=["eta_seconds"],
        stat=f"{JobStatus.canceled.value}:canceled",
        ttl=True,
    )


def request_cancel(r: Redis, job_id: str, *, prefix: str, actor: str = "api") -> tuple[JobRecord, bool]:
    """A client's cancel; returns (record, changed). queued -> canceled at once, in one transaction with the
    removal of its RQ queue entry and its `video.canceled` webhook; running -> canceling (the run stops
    between steps, or the reaper ends it after `cancel_grace_seconds`). A job already canceling or canceled
    is returned unchanged (a repeated cancel is not an error); a finished one raises InvalidTransition."""

    def unqueue(pipe: Pipeline, record: JobRecord) -> None:
        pipe.lrem(Keys(prefix).rq_queue, 0, job_id)
        pipe.delete(f"rq:job:{job_id}")  # RQ's copy: nobody will run it (a worker that took it skips it)
        _notify_on(r, prefix, "video.canceled")(pipe, record)

    for _ in range(WATCH_ATTEMPTS):
        record = _must_get(r, job_id, prefix=prefix)
        if record.status in (JobStatus.canceling, JobStatus.canceled):
            return record, False
        if record.status.terminal:
            raise InvalidTransition(
                job_id, record.status.value, JobStatus.canceled.value,
                message=f"job {job_id} already finished ({record.status.value}); only queued or running jobs "
                "can be canceled",
            )
        try:
            if record.status == JobStatus.queued:
                return _guarded(
                    r, job_id, prefix=prefix, then=unqueue, status=JobStatus.canceled, allowed=[JobStatus.queued],
                    actor=actor, set_fields=_cancel_fields(), del_fields=["eta_seconds"],
                    stat=f"{JobStatus.canceled.value}:canceled", ttl=True,
                ), True
            return _guarded(
                r, job_id, prefix=prefix, status=JobStatus.canceling, allowed=[JobStatus.running], actor=actor,
                set_fields={"updated_at": _now(), "cancel_requested_unix": time.time()},
            ), True
        except InvalidTransition:
            continue  # it moved on meanwhile (started, finished): look again
    return _must_get(r, job_id, prefix=prefix), False


def mark_requeued(
    r: Redis,
    job_id: str,
    *,
    prefix: str,
    token: str | None,
    actor: str,
    enqueue: Callable[[Pipeline, JobRecord], None] | None = None,
    deadline_seconds: float = 0.0,
) -> JobRecord:
    """running -> queued (worker lost or shut down mid-job), fenced on the run's `token`. `attempts` keeps
    counting, so the caller can give up after N with mark_failed(worker_lost). A `canceling` job is not
    re-queued (it should end `canceled`). `enqueue(pipe, record)` queues the job's RQ entry on the same
    MULTI/EXEC (service/jobs/queueing.py): the job is queued in both places or in neither."""
    _guarded(
        r,
        job_id,
        prefix=prefix,
        then=enqueue,
        status=JobStatus.queued,
        allowed=[JobStatus.running],
        token=token,
        actor=actor,
        set_fields={"stage": Stage.queued.value, "progress": 0, "updated_at": _now()},
        del_fields=["worker_id", "started_at", "step", "total_steps", "eta_seconds"],
        active=time.time() + deadline_seconds if deadline_seconds else "keep",
    )
    return _must_get(r, job_id, prefix=prefix)  # with its queue position


def expire(r: Redis, job_id: str, *, prefix: str, actor: str) -> JobRecord:
    """queued -> failed `expired`: it waited past BORA_QUEUED_EXPIRY_SECONDS (the reaper, or a worker that
    dequeued it late); its RQ entry, if any, is skipped by whichever worker takes it."""
    return mark_failed(
        r, job_id, "expired", "the job waited in the queue past its expiry and was not run",
        prefix=prefix, token=None, actor=actor,
    )


def finished_counts(r: Redis, *, prefix: str) -> dict[tuple[str, str], int]:
    """{(status, code): count} of terminal transitions so far (for bora_jobs_finished_total)."""
    raw = r.hgetall(Keys(prefix).stats_finished)
    counts: dict[tuple[str, str], int] = {}
    for field, value in strings(raw).items():
        status, _, code = field.partition(":")
        counts[(status, code)] = int(value)
    return counts


def active_counts(r: Redis, *, prefix: str) -> tuple[int, int]:
    """(jobs not terminal yet, those of them past their deadline) from the active set."""
    keys = Keys(prefix)
    pipe = r.pipeline(transaction=False)
    pipe.zcard(keys.active)
    pipe.zcount(keys.active, "-inf", time.time())
    active, overdue = pipe.execute()
    return int(active), int(overdue)


def _must_get(r: Redis, job_id: str, *, prefix: str) -> JobRecord:
    record = get(r, job_id, prefix=prefix)
    if record is None:
        raise JobNotFound(f"no job {job_id}", param="id")
    return record


def strings(fields: dict[Any, Any]) -> dict[str, str]:
    """A hash as Redis returned it (bytes or str) -> str keys and values."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
