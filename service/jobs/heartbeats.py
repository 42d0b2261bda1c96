"""Worker heartbeats: `P:worker:{wid}` hashes with a TTL, indexed by the `P:workers` set.

The worker publishes every `heartbeat_interval_seconds` with TTL `heartbeat_ttl_seconds`; a hash that
expired means the worker is gone. The API reads them for /readyz and `bora_workers_ready`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from redis import Redis

from service.jobs.jobstore import Keys
from service.jobs.schemas import WorkerHeartbeat, WorkerState, utcnow

READY_STATES = frozenset({WorkerState.ready, WorkerState.busy})


def publish(r: Redis, heartbeat: WorkerHeartbeat, *, prefix: str, ttl_seconds: int) -> None:
    """Write (or refresh) a worker's heartbeat; one MULTI/EXEC."""
    keys = Keys(prefix)
    key = keys.worker(heartbeat.worker_id)
    fields: dict[Any, Any] = {k: str(v) for k, v in heartbeat.model_dump(mode="json", exclude_none=True).items()}
    pipe = r.pipeline(transaction=True)
    pipe.delete(key)  # drop fields that became None (e.g. current_job)
    pipe.hset(key, mapping=fields)
    pipe.expire(key, ttl_seconds)
    pipe.sadd(keys.workers, heartbeat.worker_id)
    pipe.execute()


def remove(r: Redis, worker_id: str, *, prefix: str) -> None:
    keys = Keys(prefix)
    pipe = r.pipeline(transaction=True)
    pipe.delete(keys.worker(worker_id))
    pipe.srem(keys.workers, worker_id)
    pipe.execute()


def list_workers(r: Redis, *, prefix: str, max_age_seconds: float | None = None) -> list[WorkerHeartbeat]:
    """Live heartbeats; ids whose hash expired are dropped from the set. `max_age_seconds` also skips
    heartbeats not refreshed for that long (a stuck process whose key has not expired yet)."""
    keys = Keys(prefix)
    ids = sorted(_text(w) for w in r.smembers(keys.workers))
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.worker(worker_id))
    beats: list[WorkerHeartbeat] = []
    gone: list[str] = []
    oldest = utcnow() - timedelta(seconds=max_age_seconds) if max_age_seconds is not None else None
    for worker_id, fields in zip(ids, pipe.execute(), strict=True):
        if not fields:
            gone.append(worker_id)
            continue
        beat = WorkerHeartbeat.model_validate({_text(k): _text(v) for k, v in fields.items()})
        if oldest is None or beat.updated_at >= oldest:
            beats.append(beat)
    if gone:
        r.srem(keys.workers, *gone)
    return beats


def ready_workers(r: Redis, *, prefix: str, max_age_seconds: float | None = None) -> list[WorkerHeartbeat]:
    """Workers with a fresh heartbeat and their model loaded (state ready or busy)."""
    return [b for b in list_workers(r, prefix=prefix, max_age_seconds=max_age_seconds) if b.state in READY_STATES]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
