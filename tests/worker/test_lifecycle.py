import json
import logging
import time

import pytest

from service.jobs import heartbeats, jobstore
from service.jobs.errors import InvalidTransition
from service.jobs.schemas import (
    FileOutput,
    JobStatus,
    JobWarning,
    Outputs,
    Stage,
    Timings,
    VideoOutput,
    WorkerState,
)
from worker import errors
from worker.lifecycle import Heartbeat, JobLifecycle
from worker.logs import JsonFormatter
from worker.metrics import WorkerMetrics


def _life(env, payload, metrics=None):
    return JobLifecycle(
        env.r,
        env.prefix,
        payload.job_id,
        "w1",
        metrics or WorkerMetrics(),
        request_id=payload.request_id,
        tenant=payload.tenant,
        input=payload.input,
    )


def _outputs(job_id):
    video = VideoOutput(
        url="/x",
        key=f"videos/{job_id}/video.mp4",
        bytes=10,
        content_type="video/mp4",
        sha256="0" * 64,
        width=48,
        height=32,
        frames=8,
        fps=8,
        duration_s=1.0,
    )
    return Outputs(
        video=video, sidecar=FileOutput(url="/y", key="k", bytes=1, content_type="application/json")
    )


def test_success_path_and_counters(env):
    payload = env.submit(enqueue=False)
    metrics = WorkerMetrics()
    life = _life(env, payload, metrics)
    record = life.start("abc")
    assert record.status == JobStatus.running and record.stage == Stage.loading
    assert record.worker_id == "w1" and record.attempts == 1 and record.weights_sha256 == "abc"

    assert life.progress(Stage.denoising, 50, step=1, total_steps=2, eta_seconds=3) == JobStatus.running
    # progress never goes backwards, and only `succeeded` reaches 100
    life.progress(Stage.denoising, 20)
    life.progress(Stage.uploading, 100)
    assert env.record(payload.job_id).progress == 99
    life.warn([JobWarning(code="prompt_truncated", message="cut", param="prompt")])

    done = life.succeed(_outputs(payload.job_id), Timings(total_s=1.5))
    assert done.status == JobStatus.succeeded and done.progress == 100
    assert [w.code for w in done.warnings] == ["prompt_truncated"]
    assert jobstore.finished_counts(env.r, prefix=env.prefix) == {("succeeded", ""): 1}
    assert metrics.jobs.labels(status="succeeded", code="")._value.get() == 1
    assert 0 < env.r.ttl(f"{env.prefix}:job:{payload.job_id}") <= 604800


def test_failure_and_cancel(env):
    failing = env.submit(enqueue=False)
    life = _life(env, failing)
    life.start(None)
    record = life.fail(errors.OutOfMemory("too big"))
    assert record.status == JobStatus.failed
    assert (record.error.code, record.error.message, record.error.retryable) == (
        "out_of_memory",
        "too big",
        True,
    )
    # a second terminal transition is refused quietly
    assert life.cancel() is None and life.fail(errors.Internal("x")) is None

    canceled = env.submit(enqueue=False)
    life = _life(env, canceled)
    life.start(None)
    jobstore.request_cancel(env.r, canceled.job_id, prefix=env.prefix)
    assert life.progress(Stage.denoising, 10, step=1, total_steps=4) == JobStatus.canceling
    assert life.cancel().status == JobStatus.canceled
    counts = jobstore.finished_counts(env.r, prefix=env.prefix)
    assert counts == {("failed", "out_of_memory"): 1, ("canceled", "canceled"): 1}


def test_start_refused_when_canceled_while_queued(env):
    payload = env.submit(enqueue=False)
    jobstore.request_cancel(env.r, payload.job_id, prefix=env.prefix)
    with pytest.raises(InvalidTransition):
        _life(env, payload).start(None)


def test_requeue(env):
    payload = env.submit(enqueue=False)
    life = _life(env, payload)
    life.start(None)
    record = life.requeue("shutdown", env.settings)
    assert record is not None and record.status == JobStatus.queued and record.attempts == 1
    assert record.worker_id is None and env.record(payload.job_id).queue_position == 1


def test_audit_lines_are_json_with_ids(env, caplog):
    payload = env.submit(enqueue=False)
    with caplog.at_level(logging.INFO, logger="worker.lifecycle"):
        life = _life(env, payload)
        life.start(None)
        life.fail(errors.NumericalError("nan"))
    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records]
    events = [line["event"] for line in lines]
    assert events == ["job.running", "job.failed"]
    for line in lines:
        assert line["job_id"] == payload.job_id and line["request_id"] == payload.request_id
        assert line["tenant"] == "t1" and len(line["prompt_sha256"]) == 64
        assert "prompt" not in line["params"] and line["params"]["seed"] == 7
    assert lines[-1]["code"] == "numerical_error" and lines[-1]["outcome"] == "failed"


def test_heartbeat_publishes_states_and_expires(env):
    beat = Heartbeat(env.r, prefix=env.prefix, worker_id="w-hb", interval=0.1, ttl=2)
    beat.start()
    try:
        (only,) = heartbeats.list_workers(env.r, prefix=env.prefix)
        assert only.state == WorkerState.starting and only.pid
        beat.update(state=WorkerState.ready, model="tiny", device="cpu", dtype="float32")
        assert [b.worker_id for b in heartbeats.ready_workers(env.r, prefix=env.prefix)] == ["w-hb"]
        beat.update(state=WorkerState.busy, current_job="vid_x")
        first = heartbeats.list_workers(env.r, prefix=env.prefix)[0]
        assert first.current_job == "vid_x"
        time.sleep(0.35)  # the thread refreshes updated_at
        assert heartbeats.list_workers(env.r, prefix=env.prefix)[0].updated_at > first.updated_at
        beat.update(state=WorkerState.ready, current_job=None)
        assert heartbeats.list_workers(env.r, prefix=env.prefix)[0].current_job is None
        assert 0 < env.r.ttl(f"{env.prefix}:worker:w-hb") <= 2
    finally:
        beat.stop(remove=True)
    assert heartbeats.list_workers(env.r, prefix=env.prefix) == []


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate"), "out_of_memory"),
        (MemoryError(), "out_of_memory"),
        (TimeoutError(), "timeout"),
        (KeyError("boom"), "internal"),
        (errors.StorageError("s3 down"), "storage_error"),
    ],
)
def test_classify(exc, code):
    err = errors.classify(exc)
    assert err.code == code
    assert "Traceback" not in err.message


def test_classify_model_errors():
    from model import errors as model_errors

    assert errors.classify(model_errors.NumericalError("nan at step 3")).code == "numerical_error"
    assert errors.classify(model_errors.InvalidInput("num_frames=0")).code == "invalid_input"
    assert errors.classify(model_errors.Interrupted("stop")).code == "canceled"
