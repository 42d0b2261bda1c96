"""Recover jobs nobody will finish: every accepted job ends. Torch-free: the API and every worker run it.

Each pass walks the active set (`P:active`: every job not yet terminal, scored by its deadline) and looks
at each job's state:
- `queued`, waiting past BORA_QUEUED_EXPIRY_SECONDS -> `failed` (`expired`);
- `queued`, not in RQ's queue for BORA_REAPER_QUEUED_GRACE_SECONDS (its worker died between dequeue and
  start) -> back at the front of the queue;
- `running` whose worker's heartbeat (`P:worker:{wid}`, TTL `heartbeat_ttl_seconds`) has expired - whether
  or not RQ still lists it - -> `queued` again (front of the queue, same transaction) while it has had
  fewer than `reaper_max_attempts` runs, else `failed` (`worker_lost`);
- `canceling` whose worker is gone, or that its worker has not finished within BORA_CANCEL_GRACE_SECONDS,
  -> `canceled`.
Every transition is fenced on the run token the reaper saw: if the job moved on meanwhile (another reaper,
or the worker came back), nothing happens. The worker of a run ended here finds out at its next write
(refused) and stops. A job that ends here gets its webhook in the same transaction and an audit line.

Heartbeat TTL: keep it (30 s) well above `heartbeat_interval_seconds` and the longest gap between two state
writes of a job (decode + encode + upload). A worker paused past it (GC, SIGSTOP, partition) loses its job
to another run; fencing makes sure its late writes are refused.
Each pass also recounts the per-tenant queued counters that admission control keeps (`repair_queued_counts`)
and trims the listing indexes (`jobstore.trim_indexes`).
Objects no succeeded job references (runs that failed, were superseded, or died mid-upload) are deleted by
`purge_orphans`, once their job has ended.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence

from redis import Redis

from service.jobs import jobstore, queueing, retention
from service.jobs.audit import audit
from service.jobs.config import Settings
from service.jobs.errors import InvalidTransition, JobNotFound
from service.jobs.schemas import JobRecord, JobStatus
from service.jobs.storage import Storage

logger = logging.getLogger(__name__)
# Who the reaper of this process is, as a job's `writer`: a reaper repeating its own transition (a lost
# reply) is told it is done; another reaper racing it is refused.
REAPER_ID = f"reaper:{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def reap(
    r: Redis,
    settings: Settings,
    *,
    max_attempts: int | None = None,
    dead_worker: str | None = None,
    job_ids: Sequence[str] = (),
) -> dict[str, str]:
    """Handle every job that needs it once; returns {job_id: "requeued" | "restored" | "failed" | "expired" |
    "canceled"}.

    `dead_worker`: also treat this worker's jobs as orphans although its heartbeat is alive - a worker that
    lost Redis mid-job and reconnected calls this with its own id while it runs nothing, naming in `job_ids`
    the jobs it abandoned."""
    prefix = settings.key_prefix
    keys = jobstore.Keys(prefix)
    active: list[bytes] = r.zrange(keys.active, 0, -1)  # type: ignore[assignment]
    candidates = list(dict.fromkeys([_text(m) for m in active] + list(job_ids)))
    pipe = r.pipeline(transaction=False)
    for job_id in candidates:
        pipe.hgetall(keys.job(job_id))
    done: dict[str, str] = {}
    now = time.time()
    for job_id, fields in zip(candidates, pipe.execute(), strict=True):
        record = jobstore.decode(jobstore.strings(fields)) if fields else None
        if record is None or record.status.terminal:
            r.zrem(keys.active, job_id)  # expired hash, or ended by a path that already left the set
            continue
        try:
            outcome = _recover(r, settings, record, now, max_attempts or settings.reaper_max_attempts, dead_worker)
        except (InvalidTransition, JobNotFound):
            continue  # it moved on meanwhile (another reaper, its worker, a client): nothing to do
        if outcome is not None:
            done[job_id] = outcome
    return done


# KEYS: the counts hash, the active set. ARGV: the job key prefix. Counts the `queued` jobs of each tenant
# among the active jobs (every job not yet terminal is there), and rewrites the counts hash when it differs.
# Atomic, so no transition can slip in between the count and the write. Returns {tenant, was, is, ...}.
_REPAIR_LUA = """
local counts = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local job = redis.call('HMGET', ARGV[1] .. id, 'status', 'tenant')
  if job[1] == 'queued' then
    local tenant = job[2] or ''
    counts[tenant] = (counts[tenant] or 0) + 1
  end
end
local drift = {}
local held = redis.call('HGETALL', KEYS[1])
local seen = {}
for i = 1, #held, 2 do
  local tenant, was = held[i], tonumber(held[i + 1])
  seen[tenant] = true
  if was ~= (counts[tenant] or 0) then
    table.insert(drift, tenant); table.insert(drift, was); table.insert(drift, counts[tenant] or 0)
  end
end
for tenant, n in pairs(counts) do
  if not seen[tenant] then table.insert(drift, tenant); table.insert(drift, 0); table.insert(drift, n) end
end
if #drift > 0 then
  redis.call('DEL', KEYS[1])
  for tenant, n in pairs(counts) do redis.call('HSET', KEYS[1], tenant, n) end
end
return drift
"""


def repair_queued_counts(r: Redis, *, prefix: str) -> dict[str, tuple[int, int]]:
    """Recount every tenant's queued jobs (service/jobs/admission.py) and correct the counters; returns
    {tenant: (was, is)} for those that had drifted (a job hash lost while queued, a hand-edited key, a bug),
    normally {}. O(active jobs) inside Redis, once per reaper pass."""
    keys = jobstore.Keys(prefix)
    drift = r.register_script(_REPAIR_LUA)(keys=[keys.queued_counts, keys.active], args=[keys.job("")])
    found: dict[str, tuple[int, int]] = {}
    for i in range(0, len(drift), 3):
        tenant = drift[i].decode() if isinstance(drift[i], bytes) else drift[i]
        found[tenant] = (int(drift[i + 1]), int(drift[i + 2]))
    return found


def _recover(
    r: Redis, settings: Settings, record: JobRecord, now: float, max_attempts: int, dead_worker: str | None
) -> str | None:
    prefix = settings.key_prefix
    keys = jobstore.Keys(prefix)
    if record.status == JobStatus.queued:
        waited = now - (record.updated_at or record.created_at).timestamp()
        if waited > settings.queued_expiry_seconds:
            ended = jobstore.expire(r, record.id, prefix=prefix, actor=REAPER_ID)
            _audit("expired", ended, record, reason="expired", waited_s=round(waited, 1))
            return "expired"
        if waited > settings.reaper_queued_grace_seconds and r.lpos(keys.rq_queue, record.id) is None:
            if queueing.restore_entry(r, record, settings):
                _audit("restored", record, record, reason="rq_entry_lost")
                return "restored"
        return None
    alive = bool(record.worker_id and r.exists(keys.worker(record.worker_id))) and record.worker_id != dead_worker
    if record.status == JobStatus.canceling:
        requested = float(r.hget(keys.job(record.id), "cancel_requested_unix") or 0)
        if alive and now - requested < settings.cancel_grace_seconds:
            return None
        ended = jobstore.mark_canceled(r, record.id, prefix=prefix, token=record.run_token or "", actor=REAPER_ID)
        _audit("canceled", ended, record, reason="worker_lost" if not alive else "cancel_timeout")
        return "canceled"
    if alive:
        return None
    if record.attempts < max_attempts:
        ended = queueing.requeue(r, record.id, settings, token=record.run_token, actor=REAPER_ID)
        _audit("requeued", ended, record, reason="worker_lost")
        return "requeued"
    message = f"the worker running this job was lost ({record.attempts} attempt(s))"
    ended = jobstore.mark_failed(
        r, record.id, "worker_lost", message, True, prefix=prefix, token=record.run_token, actor=REAPER_ID
    )
    _audit("failed", ended, record, reason="worker_lost")
    return "failed"


def _audit(outcome: str, ended: JobRecord, seen: JobRecord, **fields: object) -> None:
    audit(
        f"job.{outcome}", ended, outcome=outcome, request_id=seen.request_id, level=logging.WARNING,
        lost_worker=seen.worker_id, attempt=seen.attempts, **fields,
    )


def defer_delete(r: Redis, prefix: str, job_id: str, key: str) -> None:
    defer_delete_all(r, prefix, job_id, [key])


def defer_delete_all(r: Redis, prefix: str, job_id: str, keys: Sequence[str]) -> None:
    """Note `keys` (objects of `job_id`'s run) as deletion candidates: `purge_orphans` deletes them once the
    job has ended, unless the job succeeded with them. A run notes its keys before uploading them, and its
    success transition takes them off the list (`adopt`): a run that dies mid-upload leaves no stray object."""
    r.hset(jobstore.Keys(prefix).orphans, mapping=dict.fromkeys(keys, job_id))


def purge_orphans(r: Redis, settings: Settings, storage: Storage) -> list[str]:
    """Delete the noted objects that no succeeded job references, once their job has ended; returns the keys
    deleted. Objects of a job that is still queued or running wait."""
    prefix = settings.key_prefix
    orphans = jobstore.Keys(prefix).orphans
    deleted = []
    for raw_key, raw_job in r.hgetall(orphans).items():  # type: ignore[union-attr]
        key, job_id = _text(raw_key), _text(raw_job)
        record = jobstore.get(r, job_id, prefix=prefix)
        if record is not None and not record.status.terminal:
            continue
        if record is None or key not in _output_keys(record):
            storage.delete(key)  # raises while storage is still down: next pass
            deleted.append(key)
        r.hdel(orphans, key)
    if deleted:
        logger.info("storage.orphans_deleted", extra={"event": "storage.orphans_deleted", "keys": deleted})
    return deleted


def _output_keys(record: JobRecord) -> set[str]:
    if record.status != JobStatus.succeeded or record.outputs is None:
        return set()
    outputs = record.outputs
    return {o.key for o in (outputs.video, outputs.thumbnail, outputs.sidecar) if o is not None}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def start(
    r: Redis, settings: Settings, stop: threading.Event, storage: Storage | None = None
) -> threading.Thread:
    """Every `settings.reaper_interval_seconds` until `stop` is set, in a daemon thread: `reap`, the queued
    counts' repair, the listing indexes' trim, and `purge_orphans` when given the storage. With the storage, a
    second thread runs the retention sweep (service/jobs/retention.py) when due: walking a large bucket must not
    hold up the recovery of jobs."""

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_seconds):
            try:
                reap(r, settings)
                drift = repair_queued_counts(r, prefix=settings.key_prefix)
                if drift:
                    logger.warning("admission.counts_repaired", extra={"event": "admission.counts_repaired",
                                                                      "drift": drift})
                jobstore.trim_indexes(r, prefix=settings.key_prefix, retention_seconds=settings.job_retention_seconds)
                if storage is not None:
                    purge_orphans(r, settings, storage)
            except Exception:  # Redis or storage down: try again next round
                logger.warning("reaper pass failed", exc_info=True)

    def sweep_loop(storage: Storage) -> None:
        while not stop.wait(settings.reaper_interval_seconds):
            try:
                retention.sweep_if_due(r, settings, storage)
            except Exception:  # Redis or storage down: try again next round
                logger.warning("retention sweep failed", exc_info=True)

    if storage is not None:
        threading.Thread(target=sweep_loop, args=(storage,), name="bora-retention", daemon=True).start()
    thread = threading.Thread(target=loop, name="bora-reaper", daemon=True)
    thread.start()
    return thread
