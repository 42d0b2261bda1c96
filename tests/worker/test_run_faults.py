"""A run of a job under Redis faults and lost workers (issue failures 1, 2, 3 and 5): the real worker loop on
the tiny pipeline, its Redis client behind a fault-injecting proxy (tests/faults/proxy.py) where needed."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from service.jobs import jobstore, reaper
from service.jobs.schemas import JobStatus
from service.jobs.storage import LocalStorage
from tests.faults.proxy import FaultProxy
from tests.worker.conftest import REDIS_URL
from tests.worker.test_jobs import WrappedPipeline


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    fault = FaultProxy(6379)
    yield fault
    fault.close()


def _client_via(proxy: FaultProxy) -> Redis:
    """Configured as service.jobs.connection.connect does: short timeouts, one quick retry."""
    return Redis.from_url(proxy.url.replace("/0", "/" + REDIS_URL.rsplit("/", 1)[1]), socket_timeout=1,
                          socket_connect_timeout=1, retry=Retry(NoBackoff(), 1))


def test_a_lost_reply_to_the_start_does_not_strand_the_job(env, make_runtime, tiny_pipeline, proxy):
    """Failure 1: `mark_running` committed, its reply was lost, the client's retry was refused, the worker
    skipped the job, and it stayed `running` forever."""
    runtime = make_runtime(tiny_pipeline, LocalStorage(env.settings.storage_dir))
    runtime.redis = _client_via(proxy)
    proxy.drop_after(runtime.worker_id.encode(), 1)  # the first write naming the worker: the start
    payload, record = env.run_one(runtime)
    assert proxy.stats["dropped_after_forward"] == 1
    assert record.status == JobStatus.succeeded, record
    assert record.attempts == 1


def test_a_lost_reply_to_the_success_keeps_the_video(env, make_runtime, tiny_pipeline, monkeypatch):
    """Failure 2: the success transition committed but its reply was lost (the client saw a connection
    error); the worker deleted the outputs of a job that says `succeeded`."""
    storage = LocalStorage(env.settings.storage_dir)
    runtime = make_runtime(tiny_pipeline, storage)
    real, lost = jobstore.mark_succeeded, []

    def committed_then_lost(*args: Any, **kwargs: Any):
        record = real(*args, **kwargs)
        if not lost:
            lost.append(record.id)
            raise RedisConnectionError("Connection closed by server.")  # after the commit: ambiguous
        return record

    monkeypatch.setattr(jobstore, "mark_succeeded", committed_then_lost)
    payload, record = env.run_one(runtime)
    assert lost == [payload.job_id]
    assert record.status == JobStatus.succeeded
    for output in (record.outputs.video, record.outputs.thumbnail, record.outputs.sidecar):
        assert storage.exists(output.key), output.key
    assert jobstore.finished_counts(env.r, prefix=env.prefix) == {("succeeded", ""): 1}


def test_a_run_whose_job_was_taken_over_stops_and_writes_nothing(env, make_runtime, tiny_pipeline, caplog):
    """Failure 3: a worker paused past its heartbeat TTL comes back while its job runs elsewhere. Its next
    write is refused: it stops at once, and neither progress nor outcome nor objects of the new run change."""
    caplog.set_level(logging.INFO)
    storage = LocalStorage(env.settings.storage_dir)
    holder: dict[str, Any] = {}

    def taken_over(step_index: int, total: int) -> None:
        if step_index == 0:  # meanwhile: the reaper re-queued the job and another worker started it
            record = env.record(holder["id"])
            jobstore.mark_requeued(env.r, holder["id"], prefix=env.prefix, token=record.run_token, actor="reaper")
            holder["token"] = jobstore.mark_running(env.r, holder["id"], "other-worker", prefix=env.prefix).token
            holder["before"] = env.r.hgetall(jobstore.Keys(env.prefix).job(holder["id"]))

    runtime = make_runtime(WrappedPipeline(tiny_pipeline, on_step=taken_over), storage)
    payload = env.submit(num_inference_steps=4)
    holder["id"] = payload.job_id
    from worker import jobs

    jobs.install(runtime)
    try:
        env.work()
    finally:
        jobs.install(None)
    assert env.r.hgetall(jobstore.Keys(env.prefix).job(payload.job_id)) == holder["before"]
    record = env.record(payload.job_id)
    assert record.status == JobStatus.running and record.run_token == holder["token"] == "other-worker:2"
    assert not list((env.settings.storage_dir).rglob("*.mp4"))
    events = [r.event for r in caplog.records if getattr(r, "job_id", None) == payload.job_id and
              r.name == "worker.lifecycle"]
    assert "job.superseded" in events and "job.succeeded" not in events and "job.failed" not in events


def test_a_queued_job_whose_queue_entry_was_lost_runs(env, runtime):
    """Failure 5: a worker took the job off RQ's queue and died before starting it: `queued`, but in no queue.
    The reaper puts it back (after a grace period) and it runs."""
    payload = env.submit()
    assert env.r.lpop(jobstore.Keys(env.prefix).rq_queue) == payload.job_id.encode()  # the dead worker's dequeue
    settings = env.settings.model_copy(update={"reaper_queued_grace_seconds": 0.01})
    time.sleep(0.05)  # past the grace: on a quiet machine the reaper would otherwise look within it
    assert reaper.reap(env.r, settings) == {payload.job_id: "restored"}
    assert reaper.reap(env.r, settings) == {}  # in the queue again: nothing more to do
    env.work()
    assert env.record(payload.job_id).status == JobStatus.succeeded


def test_a_running_job_rq_forgot_is_recovered(env):
    """Failure 1's other half: a `running` job whose worker is gone is recovered although RQ's started
    registry does not list it (the reaper used to look only there)."""
    payload = env.submit(enqueue=False)
    jobstore.mark_running(env.r, payload.job_id, "gone-worker", prefix=env.prefix)
    assert reaper.reap(env.r, env.settings) == {payload.job_id: "requeued"}
    assert env.record(payload.job_id).status == JobStatus.queued
