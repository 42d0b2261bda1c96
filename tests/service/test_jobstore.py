"""The job state machine in Redis: every transition, its guard, TTLs, stats, listing and ETAs."""

from __future__ import annotations

import pytest

from service.jobs import heartbeats, jobstore
from service.jobs.errors import InvalidTransition, JobNotFound, RunSuperseded
from service.jobs.schemas import (
    JobStatus,
    JobWarning,
    Outputs,
    Stage,
    Timings,
    VideoOutput,
    WorkerHeartbeat,
    WorkerState,
)
from tests.service.conftest import queued_record

OUTPUTS = Outputs(video=VideoOutput(url="/v1/videos/x/content", key="videos/x/video.mp4", bytes=10,
                                    content_type="video/mp4", width=64, height=64, frames=16, fps=8, duration_s=2.0))


@pytest.fixture
def job(redis_conn, prefix):
    record = queued_record()
    jobstore.create(redis_conn, record, prefix=prefix, retention_seconds=3600)
    return record


def status(r, prefix, job_id):
    return jobstore.get(r, job_id, prefix=prefix).status


def test_round_trip_keeps_every_field(redis_conn, prefix):
    record = queued_record(tenant="t1").model_copy(update={
        "metadata": {"a": "é"}, "request_id": "req-1",
        "warnings": [JobWarning(code="untrained_shape", message="m")],
    })
    jobstore.create(redis_conn, record, prefix=prefix, retention_seconds=120)
    back = jobstore.get(redis_conn, record.id, prefix=prefix)
    assert back.model_dump(exclude={"queue_position", "eta_seconds", "retention_s"}) == record.model_dump(
        exclude={"queue_position", "eta_seconds", "retention_s"})
    assert back.retention_s == 120
    fields = redis_conn.hgetall(jobstore.Keys(prefix).job(record.id))
    assert fields[b"status"] == b"queued" and b"input" in fields and b"tenant" in fields
    assert 100 < redis_conn.ttl(jobstore.Keys(prefix).job(record.id)) <= 120
    assert redis_conn.zscore(jobstore.Keys(prefix).tenant_jobs("t1"), record.id) is not None


def start(r, prefix, job_id, worker_id="w1", **kwargs):
    """queued -> running; the run's token."""
    return jobstore.mark_running(r, job_id, worker_id, prefix=prefix, **kwargs).token


def test_happy_path(redis_conn, prefix, job):
    run = jobstore.mark_running(redis_conn, job.id, "w1", prefix=prefix, weights_sha256="f" * 64)
    running, token = run.record, run.token
    assert running.status == "running" and running.worker_id == "w1" and running.attempts == 1
    assert running.started_at and running.stage == "loading" and running.weights_sha256 == "f" * 64
    assert token == running.run_token == "w1:1"
    for step in range(1, 4):
        assert jobstore.update_progress(redis_conn, job.id, Stage.denoising, step, 3, step * 30.0, 5.0 - step,
                                        prefix=prefix, token=token) == JobStatus.running
    mid = jobstore.get(redis_conn, job.id, prefix=prefix)
    assert (mid.step, mid.total_steps, mid.progress, mid.eta_seconds) == (3, 3, 90.0, 2.0)
    warning = {"code": "prompt_truncated", "message": "cut at 120"}
    jobstore.add_warnings(redis_conn, job.id, [warning], prefix=prefix, token=token)
    jobstore.add_warnings(redis_conn, job.id, [warning], prefix=prefix, token=token)  # a repeat adds nothing
    jobstore.add_warnings(redis_conn, job.id, [], prefix=prefix, token=token)
    done = jobstore.mark_succeeded(redis_conn, job.id, OUTPUTS, Timings(total_s=2.5, queue_wait_s=0.1), prefix=prefix,
                                   token=token)
    assert done.status == "succeeded" and done.progress == 100 and done.completed_at and done.eta_seconds is None
    assert done.outputs == OUTPUTS and done.timings.total_s == 2.5
    assert [w.code for w in done.warnings] == ["prompt_truncated"]
    assert jobstore.finished_counts(redis_conn, prefix=prefix) == {("succeeded", ""): 1}
    assert redis_conn.zscore(jobstore.Keys(prefix).active, job.id) is None
    # Progress after the end is refused (the run is over) and changes nothing.
    with pytest.raises(RunSuperseded):
        jobstore.update_progress(redis_conn, job.id, Stage.decoding, prefix=prefix, token=token)
    assert jobstore.get(redis_conn, job.id, prefix=prefix).stage == "denoising"


def test_terminal_transition_refreshes_the_ttl(redis_conn, prefix, job):
    key = jobstore.Keys(prefix).job(job.id)
    redis_conn.expire(key, 50)
    token = start(redis_conn, prefix, job.id)
    assert redis_conn.ttl(key) <= 50
    jobstore.mark_failed(redis_conn, job.id, "out_of_memory", "CUDA OOM", retryable=True, prefix=prefix, token=token,
                         actor=token)
    assert redis_conn.ttl(key) > 3000
    failed = jobstore.get(redis_conn, job.id, prefix=prefix)
    assert failed.error.model_dump() == {"code": "out_of_memory", "message": "CUDA OOM", "retryable": True}
    assert jobstore.finished_counts(redis_conn, prefix=prefix) == {("failed", "out_of_memory"): 1}


@pytest.mark.parametrize("terminal", ["succeeded", "failed", "canceled"])
def test_terminal_jobs_do_not_move(redis_conn, prefix, job, terminal):
    token = start(redis_conn, prefix, job.id)
    {"succeeded": lambda: jobstore.mark_succeeded(redis_conn, job.id, OUTPUTS, Timings(), prefix=prefix, token=token),
     "failed": lambda: jobstore.mark_failed(redis_conn, job.id, "internal", "x", prefix=prefix, token=token,
                                            actor=token),
     "canceled": lambda: jobstore.mark_canceled(redis_conn, job.id, prefix=prefix, token=token, actor=token),
     }[terminal]()
    for attempt in [
        lambda: jobstore.mark_running(redis_conn, job.id, "w2", prefix=prefix),
        lambda: jobstore.mark_succeeded(redis_conn, job.id, OUTPUTS, Timings(), prefix=prefix, token="w2:2"),
        lambda: jobstore.mark_failed(redis_conn, job.id, "internal", "x", prefix=prefix, token=token, actor="other"),
        lambda: jobstore.mark_canceled(redis_conn, job.id, prefix=prefix, token=token, actor="other"),
        lambda: jobstore.mark_requeued(redis_conn, job.id, prefix=prefix, token=token, actor="other"),
    ]:
        with pytest.raises(InvalidTransition):
            attempt()
    if terminal != "canceled":
        with pytest.raises(InvalidTransition):
            jobstore.request_cancel(redis_conn, job.id, prefix=prefix)
    assert status(redis_conn, prefix, job.id) == terminal
    assert sum(jobstore.finished_counts(redis_conn, prefix=prefix).values()) == 1


def test_running_twice_is_refused(redis_conn, prefix, job):
    start(redis_conn, prefix, job.id)
    with pytest.raises(InvalidTransition):
        jobstore.mark_running(redis_conn, job.id, "w2", prefix=prefix)


def test_cancel_paths(redis_conn, prefix, job):
    other = queued_record()
    jobstore.create(redis_conn, other, prefix=prefix)
    assert jobstore.request_cancel(redis_conn, other.id, prefix=prefix)[0].status == "canceled"
    assert jobstore.request_cancel(redis_conn, other.id, prefix=prefix) == (  # a repeat: unchanged, not an error
        jobstore.get(redis_conn, other.id, prefix=prefix), False)

    token = start(redis_conn, prefix, job.id)
    assert jobstore.request_cancel(redis_conn, job.id, prefix=prefix)[0].status == "canceling"
    assert jobstore.update_progress(redis_conn, job.id, Stage.denoising, 1, prefix=prefix, token=token) == "canceling"
    # The worker may still finish (it was writing outputs); succeeded wins over a late cancel.
    done = jobstore.mark_succeeded(redis_conn, job.id, OUTPUTS, Timings(), prefix=prefix, token=token)
    assert done.status == "succeeded"
    assert jobstore.finished_counts(redis_conn, prefix=prefix) == {("canceled", "canceled"): 1, ("succeeded", ""): 1}


def test_requeue_after_worker_loss(redis_conn, prefix, job):
    token = start(redis_conn, prefix, job.id)
    jobstore.update_progress(redis_conn, job.id, Stage.denoising, 5, 10, 50.0, prefix=prefix, token=token)
    again = jobstore.mark_requeued(redis_conn, job.id, prefix=prefix, token=token, actor="reaper")
    assert again.status == "queued" and again.stage == "queued" and again.progress == 0
    assert again.worker_id is None and again.started_at is None and again.step is None
    run = jobstore.mark_running(redis_conn, job.id, "w2", prefix=prefix)
    assert run.record.attempts == 2 and run.token == "w2:2"


def test_unknown_job(redis_conn, prefix):
    assert jobstore.get(redis_conn, "vid_missing", prefix=prefix) is None
    for attempt in [
        lambda: jobstore.update_progress(redis_conn, "vid_missing", Stage.denoising, prefix=prefix, token="w:1"),
        lambda: jobstore.mark_running(redis_conn, "vid_missing", "w", prefix=prefix),
        lambda: jobstore.mark_failed(redis_conn, "vid_missing", "internal", "x", prefix=prefix, token=None,
                                     actor="w"),
        lambda: jobstore.request_cancel(redis_conn, "vid_missing", prefix=prefix),
    ]:
        with pytest.raises(JobNotFound):
            attempt()
    assert not redis_conn.exists(jobstore.Keys(prefix).job("vid_missing"))


def test_queue_eta_from_recent_durations(redis_conn, prefix):
    from rq import Queue

    queue = Queue(jobstore.queue_name(prefix), connection=redis_conn)
    done = queued_record()
    jobstore.create(redis_conn, done, prefix=prefix)
    token = start(redis_conn, prefix, done.id, "w")
    jobstore.mark_succeeded(redis_conn, done.id, OUTPUTS, Timings(total_s=4.0), prefix=prefix, token=token)
    waiting = [queued_record() for _ in range(2)]
    for record in waiting:
        jobstore.create(redis_conn, record, prefix=prefix)
        queue.enqueue_call("worker.jobs.run_video_job", args=({},), job_id=record.id)
    second = jobstore.get(redis_conn, waiting[1].id, prefix=prefix)
    assert second.queue_position == 2 and second.eta_seconds == 8.0
    assert jobstore.get(redis_conn, waiting[0].id, prefix=prefix).queue_position == 1
    assert jobstore.get(redis_conn, done.id, prefix=prefix).queue_position is None


# --- fencing and repeats: every write of a run is conditional on its token, and safe to repeat -----------


def test_a_repeated_start_by_the_same_worker_gets_its_run_back(redis_conn, prefix, job):
    """Failure 1: `mark_running` committed but its reply was lost; redis-py's retry must not be refused
    (the worker then skipped the job, which stayed `running` forever)."""
    first = jobstore.mark_running(redis_conn, job.id, "w1", prefix=prefix)
    again = jobstore.mark_running(redis_conn, job.id, "w1", prefix=prefix)
    assert again.token == first.token and again.record.attempts == 1
    with pytest.raises(InvalidTransition):
        jobstore.mark_running(redis_conn, job.id, "w2", prefix=prefix)


def test_a_superseded_run_cannot_write(redis_conn, prefix, job):
    """Failure 3: once the job was re-queued and started by another run, every write of the old run is refused
    and changes nothing: progress, warnings, success, failure, cancel, requeue."""
    stale = start(redis_conn, prefix, job.id, "w1")
    jobstore.mark_requeued(redis_conn, job.id, prefix=prefix, token=stale, actor="reaper")
    with pytest.raises(InvalidTransition):  # re-queued: not this run's any more
        jobstore.update_progress(redis_conn, job.id, Stage.denoising, 1, prefix=prefix, token=stale)
    fresh = start(redis_conn, prefix, job.id, "w2")
    jobstore.update_progress(redis_conn, job.id, Stage.denoising, 2, 10, 20.0, prefix=prefix, token=fresh)
    before = redis_conn.hgetall(jobstore.Keys(prefix).job(job.id))
    for write in [
        lambda: jobstore.update_progress(redis_conn, job.id, Stage.denoising, 9, 10, 90.0, prefix=prefix, token=stale),
        lambda: jobstore.add_warnings(redis_conn, job.id, [{"code": "c", "message": "m"}], prefix=prefix, token=stale),
        lambda: jobstore.mark_succeeded(redis_conn, job.id, OUTPUTS, Timings(), prefix=prefix, token=stale),
        lambda: jobstore.mark_failed(redis_conn, job.id, "internal", "x", prefix=prefix, token=stale, actor=stale),
        lambda: jobstore.mark_canceled(redis_conn, job.id, prefix=prefix, token=stale, actor=stale),
        lambda: jobstore.mark_requeued(redis_conn, job.id, prefix=prefix, token=stale, actor=stale),
    ]:
        with pytest.raises(RunSuperseded):
            write()
    assert redis_conn.hgetall(jobstore.Keys(prefix).job(job.id)) == before


@pytest.mark.parametrize("terminal", ["succeeded", "failed", "canceled"])
def test_a_repeated_terminal_transition_succeeds_once(redis_conn, prefix, job, terminal):
    """A lost reply: the same run repeats its terminal write; it is told it is done, and it counted once."""
    token = start(redis_conn, prefix, job.id)
    write = {
        "succeeded": lambda: jobstore.mark_succeeded(redis_conn, job.id, OUTPUTS, Timings(), prefix=prefix,
                                                     token=token),
        "failed": lambda: jobstore.mark_failed(redis_conn, job.id, "internal", "x", prefix=prefix, token=token,
                                               actor=token),
        "canceled": lambda: jobstore.mark_canceled(redis_conn, job.id, prefix=prefix, token=token, actor=token),
    }[terminal]
    first, second = write(), write()
    assert first.status == second.status == terminal and second.version == first.version
    assert sum(jobstore.finished_counts(redis_conn, prefix=prefix).values()) == 1


def test_list_by_tenant_and_ties(redis_conn, prefix):
    base = queued_record()
    same_time = [queued_record(job_id=f"vid_{i:032d}").model_copy(update={"created_at": base.created_at})
                 for i in range(5)]
    for record in same_time:
        jobstore.create(redis_conn, record, prefix=prefix)
    mine = queued_record(tenant="t1")
    jobstore.create(redis_conn, mine, prefix=prefix)
    pages, cursor = [], None
    while True:
        page, cursor = jobstore.list_jobs(redis_conn, 2, cursor, prefix=prefix)
        pages.append([r.id for r in page])
        if cursor is None:
            break
    flat = [i for p in pages for i in p]
    assert flat[0] == mine.id and sorted(flat[1:], reverse=True) == flat[1:] and len(set(flat)) == 6
    assert [r.id for r in jobstore.list_jobs(redis_conn, 10, tenant="t1", prefix=prefix)[0]] == [mine.id]
    assert jobstore.list_jobs(redis_conn, 10, tenant="t2", prefix=prefix) == ([], None)


def test_heartbeats(redis_conn, prefix):
    beat = WorkerHeartbeat(worker_id="w1", state=WorkerState.busy, current_job="vid_1", pid=3)
    heartbeats.publish(redis_conn, beat, prefix=prefix, ttl_seconds=30)
    heartbeats.publish(redis_conn, beat.model_copy(update={"state": WorkerState.ready, "current_job": None}),
                       prefix=prefix, ttl_seconds=30)
    (back,) = heartbeats.list_workers(redis_conn, prefix=prefix)
    assert back.state == "ready" and back.current_job is None and back.pid == 3
    fields = redis_conn.hgetall(jobstore.Keys(prefix).worker("w1"))
    assert {b"state", b"pid", b"updated_at"} <= set(fields) and 25 < redis_conn.ttl(jobstore.Keys(prefix).worker("w1"))
    assert len(heartbeats.ready_workers(redis_conn, prefix=prefix)) == 1
    heartbeats.remove(redis_conn, "w1", prefix=prefix)
    assert heartbeats.list_workers(redis_conn, prefix=prefix) == []


def test_active_set_tracks_open_jobs_and_their_deadlines(redis_conn, prefix):
    """What `bora_jobs_active` / `bora_jobs_overdue` (and the BoraJobsOverdue alert) read."""
    on_time, late = queued_record(), queued_record()
    jobstore.create(redis_conn, on_time, prefix=prefix, deadline_seconds=3600)
    jobstore.create(redis_conn, late, prefix=prefix, deadline_seconds=-1)  # its deadline has passed
    assert jobstore.active_counts(redis_conn, prefix=prefix) == (2, 1)
    token = start(redis_conn, prefix, late.id, deadline_seconds=3600)  # a run starts: a new deadline
    assert jobstore.active_counts(redis_conn, prefix=prefix) == (2, 0)
    jobstore.mark_failed(redis_conn, late.id, "internal", "x", prefix=prefix, token=token, actor=token)
    assert jobstore.active_counts(redis_conn, prefix=prefix) == (1, 0)  # terminal: no longer open
