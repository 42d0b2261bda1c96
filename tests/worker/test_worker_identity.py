"""Worker ids are new on every start, and a starting worker recovers jobs left `running` by a dead one —
including a previous process with the same pinned BORA_WORKER_ID whose heartbeat and RQ registration live on.

(Two successive container processes with the same hostname and pid 1 cannot be made here; what matters is
that the default id does not depend on them alone, and that the recovery does not depend on the id at all.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from rq.registry import StartedJobRegistry

from service.jobs import heartbeats, jobstore
from service.jobs.schemas import JobStatus, WorkerHeartbeat, WorkerState
from worker import main
from worker.lifecycle import default_worker_id


def _start_on(env, job_id: str, worker_id: str) -> None:
    """What a worker does when it takes a job: our transition plus RQ's started-registry entry."""
    jobstore.mark_running(env.r, job_id, worker_id, prefix=env.prefix)
    registry = StartedJobRegistry(env.settings.queue_name, connection=env.r)
    env.r.zadd(registry.key, {f"{job_id}:exec-{worker_id}": time.time() + 600})


def _run_worker(env, model_dir: Path, worker_id: str) -> int:
    """`python -m worker.main --burst` in this process (tiny model, CPU); RQ's signal handlers undone after."""
    settings = env.settings.model_copy(
        update={
            "worker_id": worker_id,
            "model_preset": "tiny",
            "model_dir": model_dir,
            "device": "cpu",
            "reaper_interval_seconds": 3600.0,  # only the start-up pass may recover the job
        }
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main.run(settings, burst=True, grace_s=5)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_default_worker_id_is_new_for_every_start():
    ids = {default_worker_id() for _ in range(50)}
    assert len(ids) == 50
    prefix = re.escape(f"{socket.gethostname()}-{os.getpid()}-")
    assert all(re.fullmatch(prefix + "[0-9a-f]{6}", wid) for wid in ids), ids


def test_a_starting_worker_recovers_a_dead_workers_job(env, tiny_model_dir):
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, "0123456789ab-1-c0ffee")  # crashed: its heartbeat has expired
    assert _run_worker(env, tiny_model_dir, f"{env.prefix}-new") == 0
    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded and record.attempts == 2, record


def test_a_pinned_id_recovers_its_previous_incarnations_job(env, tiny_model_dir):
    """BORA_WORKER_ID pinned, the process crashed mid-job and restarted at once: the old heartbeat (naming the
    job) has not expired and RQ still holds the name. The new process must neither crash-loop on RQ's
    "active worker" check nor leave the job `running` behind its own live heartbeat."""
    pinned = f"{env.prefix}-pinned"
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, pinned)
    heartbeats.publish(
        env.r,
        WorkerHeartbeat(worker_id=pinned, state=WorkerState.busy, current_job=payload.job_id),
        prefix=env.prefix,
        ttl_seconds=30,
    )
    env.r.hset(f"rq:worker:{pinned}", mapping={"birth": "2025-01-01T00:00:00Z", "state": "busy"})
    env.r.expire(f"rq:worker:{pinned}", 600)

    assert _run_worker(env, tiny_model_dir, pinned) == 0
    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded and record.attempts == 2, record
