"""`DELETE /v1/videos/{id}`: forget a job completely, since its prompt may be patient data.

`delete_job` removes, in this order: every stored object of the job (local or S3: the outputs the record
names and every attempt's output keys, in case a failed or superseded run left some), then in one MULTI/EXEC
the job hash,
its places in the listings, its webhook attempt log, the RQ queue entry, and finally
its webhook messages not sent yet, RQ's copy of the payload and the job's Idempotency-Key entry. Objects go first so that a storage outage
(StorageError, 503) leaves the record in place and the client can retry; every step is safe to repeat.

A job that has not ended is canceled first: a queued one at once; a running one is asked to stop and
waited for (the worker checks between steps) up to `stop_wait_seconds`, else 409 `job_stopping` with
Retry-After (JobStopping): deleting the record under a running worker could let it upload files after they were removed.
"""

from __future__ import annotations

import contextlib
import time

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from service.jobs import idempotency, jobstore, webhooks
from service.jobs.errors import Conflict, JobStopping
from service.jobs.schemas import JobRecord
from service.jobs.storage import Storage, output_key

OUTPUT_NAMES = ("video.mp4", "thumbnail.jpg", "metadata.json")
STOP_POLL_SECONDS = 0.2


def delete_job(
    r: Redis, storage: Storage, record: JobRecord, *, prefix: str, stop_wait_seconds: float = 10.0
) -> JobRecord:
    """Delete `record`'s job everywhere and return its last state. Raises JobStopping when a running job did
    not stop within `stop_wait_seconds`, StorageError when an object could not be removed."""
    record = _stop(r, record, prefix=prefix, wait_seconds=stop_wait_seconds)
    runs = range(1, max(record.attempts, 1) + 1)
    keys = {output_key(record.id, name, attempt) for name in OUTPUT_NAMES for attempt in runs}
    if record.outputs is not None:
        keys |= {o.key for o in (record.outputs.video, record.outputs.thumbnail, record.outputs.sidecar) if o}
    for key in sorted(keys):
        storage.delete(key)
    names = jobstore.Keys(prefix)
    pipe = r.pipeline(transaction=True)
    pipe.delete(names.job(record.id), f"{names.job(record.id)}:webhooks")
    pipe.zrem(names.jobs, record.id)
    if record.tenant:
        pipe.zrem(names.tenant_jobs(record.tenant), record.id)
    pipe.lrem(names.rq_queue, 0, record.id)
    pipe.execute()
    webhooks.drop_tasks(r, prefix, record.id)  # queued messages carry the job, prompt included
    with contextlib.suppress(NoSuchJobError):
        Job.fetch(record.id, connection=r).delete(remove_from_queue=True)
    if record.idempotency_key and record.tenant:
        held = idempotency.lookup(r, prefix, record.tenant, record.idempotency_key)
        if held is not None and held[0] == record.id:  # the key may name a newer job by now
            r.delete(idempotency.redis_key(prefix, record.tenant, record.idempotency_key))
    return record


def _stop(r: Redis, record: JobRecord, *, prefix: str, wait_seconds: float) -> JobRecord:
    """The job, ended: cancel it if it has not, and wait for a running one to stop."""
    if record.status.terminal:
        return record
    with contextlib.suppress(Conflict):  # it ended meanwhile
        record, _ = jobstore.request_cancel(r, record.id, prefix=prefix, actor="api-delete")
    deadline = time.monotonic() + wait_seconds
    while not record.status.terminal:
        if time.monotonic() >= deadline:
            raise JobStopping(
                f"job {record.id} was asked to stop and is still {record.status.value}; retry the delete shortly"
            )
        time.sleep(STOP_POLL_SECONDS)
        current = jobstore.get(r, record.id, prefix=prefix)
        if current is None:  # deleted by a concurrent request
            return record
        record = current
    return record
