"""The real worker loop: RQ `SimpleWorker(...).work(burst=True)` in-process on the tiny pipeline."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from service.jobs import heartbeats, jobstore
from service.jobs.errors import StorageError
from service.jobs.schemas import JobStatus, Stage
from service.jobs.storage import LocalStorage
from worker import jobs, lifecycle
from worker.lifecycle import Heartbeat
from worker.video import SYNTHETIC_LABEL, probe_mp4, read_mp4


class WrappedPipeline:
    """The real pipeline with a hook into its step callback (or a raise instead of running)."""

    def __init__(self, pipe: Any, on_step=None, raises: BaseException | None = None) -> None:
        self._pipe, self._on_step, self._raises = pipe, on_step, raises

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, prompt, **kwargs):
        if self._raises is not None:
            kwargs["stage_callback"]("encoding_text")
            raise self._raises
        inner = kwargs["callback_on_step_end"]

        def callback(pipe, step_index, timestep, total):
            inner(pipe, step_index, timestep, total)
            if self._on_step:
                self._on_step(step_index, total)

        kwargs["callback_on_step_end"] = callback
        return self._pipe(prompt, **kwargs)


@pytest.fixture
def progress_log(monkeypatch):
    """Every progress write the worker makes, in order."""
    writes: list[dict[str, Any]] = []
    real = jobstore.update_progress

    def spy(r, job_id, stage, step=None, total_steps=None, progress=None, eta_seconds=None, *, prefix, token):
        writes.append(
            {"stage": stage, "step": step, "total": total_steps, "progress": progress, "eta": eta_seconds}
        )
        return real(r, job_id, stage, step, total_steps, progress, eta_seconds, prefix=prefix, token=token)

    monkeypatch.setattr(lifecycle.jobstore, "update_progress", spy)
    return writes


def test_job_succeeds_end_to_end(env, runtime, progress_log, tiny_pipeline):
    beat = Heartbeat(env.r, prefix=env.prefix, worker_id=runtime.worker_id, interval=60, ttl=30)
    runtime.heartbeat = beat
    payload = env.submit(num_frames=9, height=32, width=48, fps=6, num_inference_steps=3)
    assert env.record(payload.job_id).queue_position == 1

    started = time.perf_counter()
    env.work()
    elapsed = time.perf_counter() - started

    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded, record.error
    assert record.progress == 100 and record.error is None
    assert record.worker_id == runtime.worker_id and record.weights_sha256 == tiny_pipeline.weights_sha256
    assert record.started_at and record.completed_at and record.completed_at >= record.started_at

    # progress: monotonic, every stage in order, one write per denoising step
    values = [w["progress"] for w in progress_log]
    assert values == sorted(values) and values[-1] < 100
    stages = [w["stage"] for w in progress_log if w["step"] is None]
    assert stages == [
        Stage.encoding_text,
        Stage.denoising,
        Stage.decoding,
        Stage.encoding_video,
        Stage.uploading,
    ]
    steps = [(w["step"], w["total"]) for w in progress_log if w["step"] is not None]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert all(w["eta"] is not None and w["eta"] >= 0 for w in progress_log if w["step"] is not None)

    # outputs: the MP4 decodes with the requested frames/size/fps; thumbnail and sidecar are there
    out = record.outputs
    storage = runtime.storage
    video_path = storage.local_path(out.video.key)
    info = probe_mp4(video_path)
    assert (info["frames"], info["height"], info["width"], info["fps"]) == (9, 32, 48, 6.0)
    assert info["faststart"] and info["tags"]["comment"] == SYNTHETIC_LABEL
    assert out.video.url == f"/v1/videos/{payload.job_id}/content"
    assert out.video.key == f"videos/{payload.job_id}/1/video.mp4"  # attempt 1's own objects
    assert out.video.bytes == video_path.stat().st_size
    assert (out.video.frames, out.video.width, out.video.height, out.video.fps) == (9, 48, 32, 6)
    assert out.video.duration_s == pytest.approx(1.5)
    assert storage.read_bytes(out.thumbnail.key)[:3] == b"\xff\xd8\xff"
    sidecar = json.loads(storage.read_bytes(out.sidecar.key))
    assert sidecar["label"] == SYNTHETIC_LABEL and sidecar["prompt"] == payload.input.prompt
    assert sidecar["seed"] == 7 and sidecar["params"]["num_inference_steps"] == 3
    assert (
        sidecar["model"]["name"] == "tiny"
        and sidecar["model"]["weights_sha256"] == tiny_pipeline.weights_sha256
    )
    assert sidecar["software"]["bora-service"] and sidecar["request_id"] == payload.request_id
    assert {"denoising_s", "encode_s", "queue_wait_s"} <= set(sidecar["timings"])

    t = record.timings
    assert t.queue_wait_s >= 0 and t.inference_s > 0 and t.encode_s > 0 and t.upload_s >= 0
    assert t.total_s <= elapsed + 0.5
    assert t.inference_s == pytest.approx(t.encoding_text_s + t.denoising_s + t.decoding_s, abs=1e-3)

    m = runtime.metrics
    assert m.denoising_steps._value.get() == 3
    assert m.jobs.labels(status="succeeded", code="")._value.get() == 1
    assert m.steps_per_second._value.get() > 0 and m.busy._value.get() == 0
    assert jobstore.finished_counts(env.r, prefix=env.prefix) == {("succeeded", ""): 1}
    (beat_now,) = heartbeats.list_workers(env.r, prefix=env.prefix)
    assert beat_now.state == "ready" and beat_now.current_job is None


def test_same_seed_same_video(env, runtime):
    a, b = env.submit(seed=11), env.submit(seed=11)
    env.work()
    ra, rb = env.record(a.job_id), env.record(b.job_id)
    frames_a, frames_b = (read_mp4(runtime.storage.local_path(r.outputs.video.key)) for r in (ra, rb))
    assert (frames_a == frames_b).all()  # the files differ only in their job-specific metadata


def test_truncated_prompt_warns(env, runtime):
    payload = env.submit(prompt=" ".join(f"word{i}" for i in range(400)))
    env.work()
    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded
    (warning,) = [w for w in record.warnings if w.code == "prompt_truncated"]
    assert warning.param == "prompt" and "120" in warning.message


def test_invalid_payload_fails_invalid_input(env, runtime):
    payload = env.submit(enqueue=False)
    bad = payload.model_dump(mode="json")
    bad["input"]["num_frames"] = "many"
    env.enqueue(bad, payload.job_id)
    env.work()
    record = env.record(payload.job_id)
    assert record.status == JobStatus.failed and record.error.code == "invalid_input"
    assert record.error.retryable is False


def test_wrong_model_fails_invalid_input(env, runtime):
    payload = env.submit(model="bora")
    env.work()
    record = env.record(payload.job_id)
    assert record.error.code == "invalid_input" and "tiny" in record.error.message


def test_model_rejects_input(env, runtime):
    payload = env.submit(height=40)  # not a multiple of 16: the pipeline's own check
    env.work()
    record = env.record(payload.job_id)
    assert record.status == JobStatus.failed and record.error.code == "invalid_input"
    assert "height=40" in record.error.message


class FlakyStorage(LocalStorage):
    def __init__(self, root, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.calls = 0

    def put_file(self, key, path, content_type):
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageError("connection reset")
        super().put_file(key, path, content_type)


def test_storage_errors_retried_then_succeed(env, make_runtime, tiny_pipeline):
    storage = FlakyStorage(env.settings.storage_dir, failures=2)
    _, record = env.run_one(make_runtime(tiny_pipeline, storage))
    assert record.status == JobStatus.succeeded
    assert storage.calls == 5  # 2 failures + video, thumbnail, sidecar


def test_storage_down_fails_storage_error_and_leaves_nothing(env, make_runtime, tiny_pipeline):
    storage = FlakyStorage(env.settings.storage_dir, failures=10**6)
    rt = make_runtime(tiny_pipeline, storage)
    _, record = env.run_one(rt)
    assert record.status == JobStatus.failed
    assert (record.error.code, record.error.retryable) == ("storage_error", True)
    assert storage.calls == rt.upload_attempts
    assert not any(env.settings.storage_dir.rglob("*")) if env.settings.storage_dir.exists() else True
    assert jobstore.finished_counts(env.r, prefix=env.prefix) == {("failed", "storage_error"): 1}


def test_storage_fails_after_first_object_removes_it(env, make_runtime, tiny_pipeline):
    class SidecarFails(LocalStorage):
        def put_file(self, key, path, content_type):
            if key.endswith(".json"):
                raise StorageError("disk full")
            super().put_file(key, path, content_type)

    storage = SidecarFails(env.settings.storage_dir)
    payload, record = env.run_one(make_runtime(tiny_pipeline, storage))
    assert record.error.code == "storage_error"
    assert not storage.exists(f"videos/{payload.job_id}/1/video.mp4")
    assert not storage.exists(f"videos/{payload.job_id}/1/thumbnail.jpg")


@pytest.mark.parametrize(
    ("raises", "code"),
    [
        ("numerical", "numerical_error"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory"),
        (ZeroDivisionError("secret internals"), "internal"),
    ],
)
def test_pipeline_failures_map_to_codes(env, make_runtime, tiny_pipeline, raises, code, caplog):
    from model.errors import NumericalError

    exc = NumericalError("latent became NaN at step 2") if raises == "numerical" else raises
    _, record = env.run_one(
        make_runtime(WrappedPipeline(tiny_pipeline, raises=exc), LocalStorage(env.settings.storage_dir))
    )
    assert record.status == JobStatus.failed and record.error.code == code
    assert "Traceback" not in record.error.message and "secret internals" not in record.error.message
    if code == "internal":  # the traceback is in the log instead
        assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


def test_cancel_while_queued_never_runs(env, runtime):
    payload = env.submit()
    jobstore.request_cancel(env.r, payload.job_id, prefix=env.prefix)
    env.work()
    record = env.record(payload.job_id)
    assert record.status == JobStatus.canceled and record.started_at is None


def test_cancel_while_running_stops_within_one_step(env, make_runtime, tiny_pipeline, progress_log):
    holder: dict[str, str] = {}

    def cancel_after_first(step_index, total):
        if step_index == 0 and total == 6:
            jobstore.request_cancel(env.r, holder["id"], prefix=env.prefix)

    rt = make_runtime(
        WrappedPipeline(tiny_pipeline, on_step=cancel_after_first), LocalStorage(env.settings.storage_dir)
    )
    jobs.install(rt)
    try:
        payload = env.submit(num_inference_steps=6)
        holder["id"] = payload.job_id
        follower = env.submit()  # the worker moves on to the next job
        env.work()
    finally:
        jobs.install(None)
    record = env.record(payload.job_id)
    assert record.status == JobStatus.canceled and record.error.code == "canceled"
    # the cancel landed after step 1; step 2's write saw `canceling`, and no step 3 ran
    steps = [w["step"] for w in progress_log if w["step"] is not None and w["total"] == 6]
    assert steps == [1, 2]
    assert record.outputs is None
    assert env.record(follower.job_id).status == JobStatus.succeeded
    assert jobstore.finished_counts(env.r, prefix=env.prefix)[("canceled", "canceled")] == 1


def test_time_limit_fails_timeout(env, make_runtime, tiny_pipeline):
    rt = make_runtime(
        WrappedPipeline(tiny_pipeline, on_step=lambda i, n: time.sleep(1.1)),
        LocalStorage(env.settings.storage_dir),
    )
    rt.settings = env.settings.model_copy(update={"job_timeout_seconds": 1})
    _, record = env.run_one(rt, num_inference_steps=5)
    assert record.status == JobStatus.failed and record.error.code == "timeout"
    assert record.step is not None and record.step < 5
