"""Retention: a job's outputs are deleted once its record is, in every storage backend.

A job's record (`P:job:{id}`) expires BORA_RETENTION_SECONDS after the job ended (jobstore: the terminal
transition sets the TTL). `sweep` walks the stored outputs (`videos/{job}/{attempt}/...`) and deletes a
job's objects when its record is gone and its newest object is older than the retention, so an object is
never deleted while a record points at it or a run is still writing it. Walking the storage, rather than a
list of jobs kept in Redis, also finds objects written before this sweeper existed and objects whose job was
lost with a Redis wipe.

Several replicas (every API and worker runs the reaper loop that calls `sweep_if_due`) share one sweep per
BORA_RETENTION_SWEEP_INTERVAL_SECONDS through a Redis lock that expires with the interval; a sweep cut
short is finished by the next (every delete is safe to repeat). What was deleted is counted in Redis
(`P:stats:retention`), which the API exposes as `bora_retention_deleted_objects_total`.
S3 deployments may also set a bucket lifecycle rule (deploy/minio/setup-bucket.sh); it expires objects by
age alone, in whole days, so it is a backstop, not a replacement.
"""

from __future__ import annotations

import itertools
import logging
import time

from redis import Redis

from service.jobs import jobstore
from service.jobs.config import Settings
from service.jobs.storage import OUTPUTS_PREFIX, Storage

logger = logging.getLogger(__name__)


def sweep(r: Redis, settings: Settings, storage: Storage, *, now: float | None = None) -> list[str]:
    """Delete the outputs of jobs past retention; returns the keys deleted. Raises StorageError (or a Redis
    error) when a backend is down: what was deleted so far stays deleted and counted."""
    cutoff = (time.time() if now is None else now) - settings.job_retention_seconds
    keys = jobstore.Keys(settings.key_prefix)
    deleted: list[str] = []
    listing = storage.list_objects(OUTPUTS_PREFIX)
    for job_id, objects in itertools.groupby(listing, key=lambda entry: _job_of(entry[0])):
        found = list(objects)
        if max(modified for _, modified in found) > cutoff or r.exists(keys.job(job_id)):
            continue
        for key, _ in found:
            storage.delete(key)
        deleted += [key for key, _ in found]
        pipe = r.pipeline(transaction=True)
        pipe.hincrby(keys.stats_retention, "objects", len(found))
        pipe.hincrby(keys.stats_retention, "jobs", 1)
        pipe.execute()
        logger.info("retention.deleted", extra={"event": "retention.deleted", "job_id": job_id, "objects": len(found)})
    return deleted


def sweep_if_due(r: Redis, settings: Settings, storage: Storage) -> list[str] | None:
    """`sweep`, unless another replica (or this one) swept less than an interval ago; None when not due."""
    lock = jobstore.Keys(settings.key_prefix).retention_lock
    if not r.set(lock, str(time.time()), nx=True, ex=max(1, round(settings.retention_sweep_interval_seconds))):
        return None
    try:
        return sweep(r, settings, storage)
    except Exception:
        r.delete(lock)  # the next reaper pass tries again instead of waiting a whole interval
        raise


def deleted_counts(r: Redis, *, prefix: str) -> tuple[int, int]:
    """(objects, jobs) the sweeper has deleted so far, in every replica together."""
    raw = jobstore.strings(r.hgetall(jobstore.Keys(prefix).stats_retention))  # type: ignore[arg-type]
    return int(raw.get("objects", 0)), int(raw.get("jobs", 0))


def _job_of(key: str) -> str:
    """`videos/{job}/...` -> job id (a stray file directly under `videos/` is its own group)."""
    return key[len(OUTPUTS_PREFIX):].split("/", 1)[0]
