"""Jobs of dead workers (heartbeat expired) are re-queued once, then fail `worker_lost`; none stays running."""

from __future__ import annotations

import threading
import time

from rq.registry import StartedJobRegistry

from service.jobs import heartbeats, jobstore, reaper
from service.jobs.schemas import (
    JobStatus,
    Outputs,
    Timings,
    VideoOutput,
    WorkerHeartbeat,
    WorkerState,
    content_url,
)
from service.jobs.storage import LocalStorage, output_key


def _start_on(env, job_id: str, worker_id: str) -> None:
    """What a worker does when it takes a job: our transition plus RQ's started-registry entry."""
    jobstore.mark_running(env.r, job_id, worker_id, prefix=env.prefix)
    registry = StartedJobRegistry(env.settings.queue_name, connection=env.r)
    env.r.zadd(registry.key, {f"{job_id}:exec-{worker_id}": time.time() + 600})


def test_dead_worker_job_requeued_once_then_fails(env, runtime):
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, "ghost-1")
    assert reaper.reap(env.r, env.settings) == {payload.job_id: "requeued"}
    record = env.record(payload.job_id)
    assert record.status == JobStatus.queued and record.queue_position == 1 and record.attempts == 1
    assert reaper.reap(env.r, env.settings) == {}  # nothing left to do

    env.r.delete(f"rq:queue:{env.settings.queue_name}")  # as if another worker took it...
    _start_on(env, payload.job_id, "ghost-2")  # ...and died too
    assert reaper.reap(env.r, env.settings) == {payload.job_id: "failed"}
    record = env.record(payload.job_id)
    assert record.status == JobStatus.failed and record.error.code == "worker_lost" and record.error.retryable


def test_requeued_job_runs_to_success(env, runtime):
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, "ghost")
    reaper.reap(env.r, env.settings)
    env.work()
    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded and record.attempts == 2


def test_live_worker_and_canceling_jobs(env):
    alive, canceling = env.submit(enqueue=False), env.submit(enqueue=False)
    heartbeats.publish(
        env.r, WorkerHeartbeat(worker_id="alive", state=WorkerState.busy), prefix=env.prefix, ttl_seconds=30
    )
    _start_on(env, alive.job_id, "alive")
    _start_on(env, canceling.job_id, "ghost")
    jobstore.request_cancel(env.r, canceling.job_id, prefix=env.prefix)
    assert reaper.reap(env.r, env.settings) == {canceling.job_id: "canceled"}
    assert env.record(alive.job_id).status == JobStatus.running
    assert env.record(canceling.job_id).status == JobStatus.canceled


def test_a_worker_that_lost_redis_requeues_its_own_jobs(env):
    """Its heartbeat is alive, so other reapers leave the job; the worker itself names it as lost."""
    payload = env.submit(enqueue=False)
    heartbeats.publish(
        env.r, WorkerHeartbeat(worker_id="me", state=WorkerState.ready), prefix=env.prefix, ttl_seconds=30
    )
    jobstore.mark_running(env.r, payload.job_id, "me", prefix=env.prefix)  # not in RQ's registry any more
    assert reaper.reap(env.r, env.settings) == {}
    assert reaper.reap(env.r, env.settings, dead_worker="me", job_ids=[payload.job_id]) == {
        payload.job_id: "requeued"
    }
    assert env.record(payload.job_id).status == JobStatus.queued


def test_reaper_thread_runs_every_interval(env):
    payload = env.submit(enqueue=False)
    _start_on(env, payload.job_id, "ghost")
    stop = threading.Event()
    reaper.start(env.r, env.settings.model_copy(update={"reaper_interval_seconds": 0.05}), stop)
    try:
        deadline = time.monotonic() + 5
        while env.record(payload.job_id).status != JobStatus.queued and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
    assert env.record(payload.job_id).status == JobStatus.queued


def test_deferred_deletes_wait_for_the_job_to_end(env, tmp_path):
    """Noted objects are deleted once their job has ended - except those its succeeded record points at."""
    storage = LocalStorage(tmp_path / "objects")
    failed, rerun = env.submit(enqueue=False), env.submit(enqueue=False)
    lost_run, good_run = output_key(rerun.job_id, "video.mp4", 1), output_key(rerun.job_id, "video.mp4", 2)
    for job_id, key in ((failed.job_id, output_key(failed.job_id, "video.mp4", 1)), (rerun.job_id, lost_run),
                        (rerun.job_id, good_run)):
        storage.put_bytes(key, b"v", "video/mp4")
        reaper.defer_delete(env.r, env.prefix, job_id, key)
    assert reaper.purge_orphans(env.r, env.settings, storage) == []  # both still queued
    token = jobstore.mark_running(env.r, failed.job_id, "w", prefix=env.prefix).token
    jobstore.mark_failed(env.r, failed.job_id, "storage_error", "s3 down", True, prefix=env.prefix, token=token,
                         actor=token)
    assert reaper.purge_orphans(env.r, env.settings, storage) == [output_key(failed.job_id, "video.mp4", 1)]
    assert not storage.exists(output_key(failed.job_id, "video.mp4", 1))
    jobstore.mark_running(env.r, rerun.job_id, "w", prefix=env.prefix)  # attempt 1: lost mid-upload
    jobstore.mark_requeued(env.r, rerun.job_id, prefix=env.prefix, token=None, actor="test")
    token = jobstore.mark_running(env.r, rerun.job_id, "w", prefix=env.prefix).token
    assert token == "w:2"
    video = VideoOutput(
        url=content_url(rerun.job_id), key=good_run, bytes=1,
        content_type="video/mp4", sha256="00" * 32, width=32, height=32, frames=1, fps=8, duration_s=0.125,
    )  # fmt: skip
    jobstore.mark_succeeded(env.r, rerun.job_id, Outputs(video=video), Timings(), prefix=env.prefix, token=token)
    assert reaper.purge_orphans(env.r, env.settings, storage) == [lost_run]  # the lost run's; not the record's
    assert storage.exists(good_run) and not storage.exists(lost_run)
    assert env.r.hlen(jobstore.Keys(env.prefix).orphans) == 0