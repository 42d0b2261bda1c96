"""`run_video_job(payload)`: the one function the API enqueues (by dotted path `worker.jobs.run_video_job`).

It runs inside an RQ `SimpleWorker` in the process that holds the resident pipeline (`install(Runtime)`,
done once by worker/main.py or a test). A job: re-validate the payload → running → text encoding,
denoising (progress + cancel poll every step), decoding → MP4 + JPEG poster + JSON sidecar in a temp dir
→ upload with retries → succeeded. Any failure ends `failed` with a code from worker/errors.py; a cancel
ends `canceled`; a shutdown past the grace period re-queues the job. State changes go through
worker/lifecycle.py only. The function returns a small summary (RQ keeps it as the result); the job
record in Redis is the truth. The pipeline call is worker/batch.py's: with BORA_WORKER_BATCH_SIZE > 1 it
also runs compatible queued jobs the worker claimed, each still its own `VideoJobRun`.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import logging
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs import queueing, reaper
from service.jobs.config import Settings
from service.jobs.errors import InvalidTransition, JobExpired, JobNotFound, RunSuperseded
from service.jobs.errors import StorageError as ServiceStorageError
from service.jobs.schemas import (
    FileOutput,
    ImageOutput,
    JobPayload,
    JobStatus,
    JobWarning,
    Outputs,
    Stage,
    Timings,
    VideoOutput,
    content_url,
    utcnow,
)
from service.jobs.storage import Storage, output_key
from worker import errors
from worker.lifecycle import Heartbeat, JobLifecycle
from worker.metrics import WorkerMetrics
from worker.video import SYNTHETIC_LABEL, encode_mp4, write_thumbnail

logger = logging.getLogger(__name__)

# Progress (0–100) at the start of each stage; denoising fills DENOISE_START..DENOISE_END by step.
STAGE_PROGRESS = {
    Stage.loading: 0.0,
    Stage.encoding_text: 2.0,
    Stage.denoising: 5.0,
    Stage.decoding: 90.0,
    Stage.encoding_video: 94.0,
    Stage.uploading: 97.0,
}
DENOISE_START, DENOISE_END = 5.0, 90.0
REDIS_LOST = (RedisConnectionError, RedisTimeoutError)  # Redis unreachable, as opposed to a job failure


@dataclass
class Runtime:
    """What a job needs from its process: the resident pipeline, Redis, storage, metrics, heartbeat."""

    pipeline: Any  # model.pipeline.BoraPipeline (typed loosely: this module imports torch lazily)
    redis: Redis
    settings: Settings
    storage: Storage
    metrics: WorkerMetrics
    worker_id: str
    heartbeat: Heartbeat | None = None
    device: str = "cpu"
    dtype: str = "float32"
    upload_attempts: int = 4
    upload_backoff_s: float = 0.5  # doubles per retry: 0.5, 1, 2 s
    # Set by the SIGTERM handler once the grace period is over: the running job stops between steps and
    # re-queues itself.
    shutdown: threading.Event = field(default_factory=threading.Event)
    # Jobs this process put back on the queue while RQ was running them: their RQ entry is the next run's,
    # which RQ's end-of-job bookkeeping must leave alone (worker/main.py's BoraWorker).
    requeued: set[str] = field(default_factory=set)
    # Jobs abandoned because Redis went away mid-job; worker/main.py re-queues them once it is back.
    lost: list[str] = field(default_factory=list)
    current_job: str | None = None
    # Out-of-memory failures in a row; at settings.max_consecutive_ooms the worker exits non-zero (its device
    # is in a state a restart clears: fragmentation, a leak) - worker/main.py's BoraWorker checks it.
    consecutive_ooms: int = 0


_runtime: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Make `runtime` the one this process's jobs use (None uninstalls it)."""
    global _runtime
    _runtime = runtime


def current_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no worker runtime installed: run jobs with `python -m worker.main`")
    return _runtime


def software_version() -> str:
    try:
        return importlib.metadata.version("bora-service")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def run_video_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The enqueued function. Never raises for job failures: they end in the job record. With
    BORA_WORKER_BATCH_SIZE > 1 it also claims compatible queued jobs and runs them in the same batch
    (worker/batch.py); the summary returned is this RQ job's."""
    from worker.batch import Batch

    rt = current_runtime()
    prefix = rt.settings.key_prefix
    try:
        job = JobPayload.model_validate(payload)
    except ValidationError as exc:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        logger.warning(
            "invalid job payload", extra={"job_id": job_id, "errors": exc.errors(include_url=False)}
        )
        if isinstance(job_id, str):
            life = JobLifecycle(rt.redis, prefix, job_id, rt.worker_id, rt.metrics)
            life.fail(errors.InvalidInput(f"the job payload is invalid: {exc.error_count()} error(s)"))
        return {"job_id": job_id, "status": JobStatus.failed.value, "code": "invalid_input"}
    first = VideoJobRun(rt, job)
    batch = Batch(rt, first)
    try:
        return batch.run()
    except REDIS_LOST:
        rt.lost.extend(run.job.job_id for run in batch.runs)
        raise


class VideoJobRun:
    """One execution of one job on this worker: its state writes, stages, files and outcome. The pipeline
    call it shares with the other jobs of its batch is worker/batch.py's."""

    def __init__(self, rt: Runtime, job: JobPayload, *, claimed: bool = False) -> None:
        self.rt = rt
        self.job = job
        # Taken off the queue by another job's batch, not dequeued by RQ: RQ has no entry of it to clean up.
        self.claimed = claimed
        self.life = JobLifecycle(
            rt.redis,
            rt.settings.key_prefix,
            job.job_id,
            rt.worker_id,
            rt.metrics,
            request_id=job.request_id,
            tenant=job.tenant,
            input=job.input,
        )
        self.durations: dict[str, float] = {}
        self.queue_wait_s: float | None = None
        self.interrupt_reason: str | None = None  # "cancel" | "shutdown" | "timeout"
        self.limit_s = queueing.run_limit(rt.settings, job.timeout_seconds)
        self.deadline = time.monotonic() + self.limit_s
        self.life.settle_seconds = rt.settings.heartbeat_ttl_seconds
        self._stage: Stage | None = None
        self._stage_started = 0.0
        self._denoise_started = 0.0
        self._step_seconds: float | None = None
        self._started = 0.0
        self.uploaded: list[str] = []
        self._warn_existing: set[str] = set()
        self.summary: dict[str, Any] | None = None  # set once the run has ended (or was skipped)
        self.store_prompt = True  # the record's decision (BORA_STORE_PROMPT when it was created), read at start

    def _end(self, status: str, code: str | None) -> None:
        self.summary = {"job_id": self.job.job_id, "status": status, "code": code}

    # -- the run's ends ---------------------------------------------------------------------------------

    def begin(self) -> bool:
        """queued -> running under this run's token. False when the job is not ours to run (expired, canceled
        while queued, taken by another worker): `summary` then says why."""
        rt, job = self.rt, self.job
        try:
            record = self.life.start(
                getattr(rt.pipeline, "weights_sha256", None),
                deadline_seconds=queueing.run_deadline(rt.settings, job.timeout_seconds),
            )
        except JobExpired:
            self.life.expire()
            self._end(JobStatus.failed.value, "expired")
            return False
        except (InvalidTransition, JobNotFound) as exc:
            # Canceled while queued, taken by another worker, or expired: nothing to do.
            self.life.audit("job.skipped", logging.WARNING, outcome=getattr(exc, "current", "missing"))
            self._end("skipped", None)
            return False
        self._started = time.perf_counter()
        self.store_prompt = record.store_prompt
        self.deadline = time.monotonic() + self.limit_s
        enqueued = job.enqueued_at or record.created_at
        if record.started_at is not None:
            self.queue_wait_s = max((record.started_at - enqueued).total_seconds(), 0.0)
            rt.metrics.observe_stage("queue_wait", self.queue_wait_s)
        self._warn_existing = {w.code for w in record.warnings}
        return True

    def finish(self, frames: Any, token_count: int, truncated: bool) -> None:
        """This job's video generated: MP4 + poster + sidecar, upload, succeeded. A failure fails this job only."""
        inp = self.job.input
        try:
            expected = (inp.num_frames, inp.height, inp.width, 3)
            if tuple(frames.shape) != expected:
                raise RuntimeError(f"pipeline returned frames {tuple(frames.shape)}, expected {expected}")
            with tempfile.TemporaryDirectory(prefix=f"bora-{self.job.job_id}-") as tmp:
                self.warn_truncation(token_count, truncated)
                files = self.encode(frames, Path(tmp))
                outputs = self.upload(files)
                self.close_stage()
                total = time.perf_counter() - self._started
                self.life.succeed(outputs, self.timings(total))
                self._observe(total)
                self.rt.consecutive_ooms = 0
                self._end(JobStatus.succeeded.value, None)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a job state here
            self.stop(exc)

    def stop(self, exc: Exception) -> None:
        """End this run because of `exc`: superseded, interrupted (cancel, time limit, shutdown) or failed."""
        if isinstance(exc, RunSuperseded):
            self._end(*self._stop_superseded(exc))
        else:
            self._end(*self._handle_failure(exc, time.perf_counter() - self._started))

    def check_model(self) -> None:
        served = getattr(self.rt.pipeline, "name", None)
        if served is not None and self.job.model != served:
            raise errors.InvalidInput(f"this worker serves model {served!r}, not {self.job.model!r}")

    def _handle_failure(self, exc: Exception, total: float) -> tuple[str, str | None]:
        from model.errors import Interrupted

        self.close_stage()
        if isinstance(exc, REDIS_LOST):
            # Its state cannot be written now, and may even have been (a lost reply): it stays `running` under
            # this run, and worker/main.py re-queues it once Redis is back. Uploaded objects stay: the record
            # may point at them; the reaper deletes them if it does not.
            raise exc
        if isinstance(exc, Interrupted) and self.interrupt_reason == "timeout":
            err: errors.WorkerError = errors.Timeout(
                f"the job ran past its limit of {self.limit_s} s"
            )
        elif isinstance(exc, Interrupted) and self.interrupt_reason == "shutdown":
            self._delete_uploaded()
            # State and RQ entry in one transaction: a crash now cannot leave it `queued` but off the queue.
            if self.life.requeue("worker shutting down", self.rt.settings) is not None:
                self._protect_rq_entry()
                return JobStatus.queued.value, None
            err = errors.Canceled("canceled while the worker was shutting down")  # no longer `running`
        else:
            err = errors.classify(exc)
        self._delete_uploaded()
        if isinstance(err, errors.Canceled):
            self.life.cancel()
            return JobStatus.canceled.value, "canceled"
        if isinstance(err, errors.Internal):
            self.life.audit(
                "job.error", logging.ERROR, exc_info=exc, code=err.code, error_type=type(exc).__name__
            )
        else:
            self.life.audit("job.error", logging.WARNING, code=err.code, error=str(exc))
        if isinstance(err, errors.OutOfMemory):
            self._free_accelerator_memory(exc)
            self.rt.consecutive_ooms += 1
        else:
            self.rt.consecutive_ooms = 0
        self.life.fail(err, self.timings(total))
        return JobStatus.failed.value, err.code

    def _stop_superseded(self, exc: RunSuperseded) -> tuple[str, str | None]:
        """The job store refused this run's write: the job was re-queued, taken by another run or ended by
        the reaper (this worker was paused or cut off past its heartbeat). Stop at once, write nothing about
        the job, and remove this run's objects (attempt-specific: nobody else references them). Its RQ
        entry may already be the next run's: RQ's end-of-job bookkeeping must leave it alone."""
        self.close_stage()
        self.life.audit("job.superseded", logging.WARNING, outcome="superseded", current=exc.current)
        self._delete_uploaded()
        self._protect_rq_entry()
        return "superseded", None

    def _protect_rq_entry(self) -> None:
        """The job's RQ entry may be the next run's now: RQ's end-of-job bookkeeping of this execution must
        leave it alone (worker/main.py). A claimed run was never RQ's: nothing to protect."""
        if not self.claimed:
            self.rt.requeued.add(self.job.job_id)

    # -- stages -----------------------------------------------------------------------------------------

    def _enter_stage(self, stage: Stage) -> None:
        self.close_stage()
        self._stage = stage
        self._stage_started = time.perf_counter()
        self._poll(self.life.progress(stage, STAGE_PROGRESS[stage]))

    def close_stage(self) -> None:
        if self._stage is not None:
            self.durations[self._stage.value] = time.perf_counter() - self._stage_started
            self._stage = None

    def _poll(self, status: JobStatus | None) -> None:
        """Turn the status returned by a progress write into the cancel flag (no extra Redis read)."""
        if status in (JobStatus.canceling, JobStatus.canceled, None) and self.interrupt_reason is None:
            self.interrupt_reason = "cancel"

    def should_cancel(self) -> bool:
        """Checked by the sampler before every step: cancel, shutdown past grace, or time limit."""
        if self.interrupt_reason is None:
            if self.rt.shutdown.is_set():
                self.interrupt_reason = "shutdown"
            elif time.monotonic() > self.deadline:
                self.interrupt_reason = "timeout"
        return self.interrupt_reason is not None

    def _raise_if_interrupted(self) -> None:
        from model.errors import Interrupted

        if self.should_cancel():
            raise Interrupted(f"stopped between stages ({self.interrupt_reason})")

    def on_stage(self, name: str) -> None:
        stage = Stage(name)
        self._enter_stage(stage)
        if stage == Stage.denoising:
            self._denoise_started = time.perf_counter()
        self._raise_if_interrupted()

    def on_step(self, _pipe: Any, step_index: int, _timestep: int, total: int) -> None:
        done = step_index + 1
        elapsed = time.perf_counter() - self._denoise_started
        self._step_seconds = elapsed / done
        # Remaining steps, plus decode/encode/upload at roughly one step's worth each (refined by history).
        eta = (total - done) * self._step_seconds + 3 * self._step_seconds
        progress = DENOISE_START + (DENOISE_END - DENOISE_START) * done / total
        self.rt.metrics.denoising_steps.inc()
        self._poll(
            self.life.progress(Stage.denoising, progress, step=done, total_steps=total, eta_seconds=eta)
        )

    def warn_truncation(self, token_count: int, truncated: bool) -> None:
        if not truncated or "prompt_truncated" in self._warn_existing:
            return
        limit = getattr(getattr(self.rt.pipeline, "text_encoder", None), "model_max_length", 120)
        self.life.warn(
            [
                JobWarning(
                    code="prompt_truncated",
                    message=f"the prompt is {token_count} tokens long; the text encoder read only the first {limit}",
                    param="prompt",
                )
            ]
        )

    def encode(self, frames: Any, tmp: Path) -> dict[str, Path]:
        self._enter_stage(Stage.encoding_video)
        self._raise_if_interrupted()
        inp = self.job.input
        video = tmp / "video.mp4"
        encode_mp4(
            frames,
            inp.fps,
            video,
            {
                "title": f"Bora synthetic video {self.job.job_id}",
                "comment": SYNTHETIC_LABEL,
                "description": self._prompt_text()[:1000],
            },
        )
        thumbnail = tmp / "thumbnail.jpg"
        write_thumbnail(frames[len(frames) // 2], thumbnail)
        self.close_stage()
        return {"video": video, "thumbnail": thumbnail}

    def _prompt_text(self) -> str:
        """The prompt as the MP4's `description` tag shows it: itself, or only its hash (BORA_STORE_PROMPT)."""
        inp = self.job.input
        return (inp.prompt or "") if self.store_prompt else f"prompt sha256:{inp.prompt_sha256}"

    def upload(self, files: dict[str, Path]) -> Outputs:
        self._enter_stage(Stage.uploading)
        self._raise_if_interrupted()
        job_id, inp = self.job.job_id, self.job.input
        attempt = self.life.attempt
        video_key, thumb_key, sidecar_key = (
            output_key(job_id, "video.mp4", attempt),
            output_key(job_id, "thumbnail.jpg", attempt),
            output_key(job_id, "metadata.json", attempt),
        )
        # Noted as deletion candidates before they exist: if this run dies mid-upload, or never succeeds,
        # the reaper removes them; the success transition takes them off the list.
        reaper.defer_delete_all(self.rt.redis, self.rt.settings.key_prefix, job_id, [video_key, thumb_key, sidecar_key])
        video = VideoOutput(
            url=content_url(job_id),
            key=video_key,
            bytes=files["video"].stat().st_size,
            content_type="video/mp4",
            sha256=file_sha256(files["video"]),
            width=inp.width,
            height=inp.height,
            frames=inp.num_frames,
            fps=inp.fps,
            duration_s=round(inp.num_frames / inp.fps, 4),
        )
        thumbnail = ImageOutput(
            url=content_url(job_id, "thumbnail"),
            key=thumb_key,
            bytes=files["thumbnail"].stat().st_size,
            content_type="image/jpeg",
            sha256=file_sha256(files["thumbnail"]),
            width=inp.width,
            height=inp.height,
        )
        self._put(video_key, files["video"], "video/mp4")
        self._put(thumb_key, files["thumbnail"], "image/jpeg")
        sidecar_path = files["video"].parent / "metadata.json"
        sidecar_path.write_text(json.dumps(self.sidecar(video, thumbnail), indent=2, ensure_ascii=False))
        sidecar = FileOutput(
            url=content_url(job_id, "metadata"),
            key=sidecar_key,
            bytes=sidecar_path.stat().st_size,
            content_type="application/json",
            sha256=file_sha256(sidecar_path),
        )
        self._put(sidecar_key, sidecar_path, "application/json")
        self.close_stage()
        return Outputs(video=video, thumbnail=thumbnail, sidecar=sidecar)

    def _put(self, key: str, path: Path, content_type: str) -> None:
        """Upload with exponential backoff; a storage that keeps failing fails the job `storage_error`."""
        attempts = max(self.rt.upload_attempts, 1)
        for attempt in range(1, attempts + 1):
            try:
                self.rt.storage.put_file(key, path, content_type)
                self.uploaded.append(key)
                return
            except (ServiceStorageError, OSError) as exc:
                if attempt == attempts:
                    raise errors.StorageError(f"could not store the video after {attempts} attempts") from exc
                delay = self.rt.upload_backoff_s * 2 ** (attempt - 1)
                self.life.audit(
                    "job.upload_retry",
                    logging.WARNING,
                    key=key,
                    attempt=attempt,
                    delay_s=delay,
                    error=str(exc),
                )
                time.sleep(delay)

    def _delete_uploaded(self) -> None:
        """A run that did not succeed removes its objects (keys of this attempt only, so never an object a
        succeeded record references). Best effort: each was noted before upload, so what cannot be deleted
        now (storage down) is deleted by the reaper later."""
        for key in self.uploaded:
            try:
                self.rt.storage.delete(key)
            except Exception:  # noqa: BLE001 - best effort; the job's outcome is what matters
                self.life.audit("job.cleanup_deferred", logging.WARNING, key=key)
        self.uploaded.clear()

    # -- results ----------------------------------------------------------------------------------------

    def timings(self, total: float) -> Timings:
        d = self.durations
        inference = [d[s] for s in ("encoding_text", "denoising", "decoding") if s in d]
        return Timings(
            queue_wait_s=_round(self.queue_wait_s),
            load_s=_round(d.get("loading")),
            encoding_text_s=_round(d.get("encoding_text")),
            denoising_s=_round(d.get("denoising")),
            decoding_s=_round(d.get("decoding")),
            inference_s=_round(sum(inference)) if inference else None,
            encode_s=_round(d.get("encoding_video")),
            upload_s=_round(d.get("uploading")),
            total_s=_round(total),
        )

    def sidecar(self, video: VideoOutput, thumbnail: ImageOutput) -> dict[str, Any]:
        """The JSON written next to the video: what was generated, how, by what, and that it is synthetic."""
        rt, job = self.rt, self.job
        return {
            "label": SYNTHETIC_LABEL,
            "job_id": job.job_id,
            "created_at": utcnow().isoformat(),
            "prompt": job.input.prompt if self.store_prompt else None,
            "prompt_sha256": job.input.prompt_sha256,
            "params": job.input.params(),
            "seed": job.seed,
            "model": {
                "name": getattr(rt.pipeline, "name", job.model),
                "weights_sha256": getattr(rt.pipeline, "weights_sha256", None),
                "device": rt.device,
                "dtype": rt.dtype,
            },
            # Upload time is not known yet when the sidecar itself is written; the job record has it.
            "timings": self.timings(0.0).model_dump(exclude={"total_s", "upload_s"}, exclude_none=True),
            "software": {"bora-service": software_version()},
            "video": video.model_dump(mode="json", exclude={"url"}),
            "thumbnail": thumbnail.model_dump(mode="json", exclude={"url"}),
            "client_metadata": job.metadata,
            "request_id": job.request_id,
        }

    def _observe(self, total: float) -> None:
        m = self.rt.metrics
        for stage, seconds in self.durations.items():
            if stage != "loading":
                m.observe_stage(stage, seconds)
        m.observe_stage("total", total)
        denoise = self.durations.get("denoising")
        if denoise:
            m.steps_per_second.set(self.job.input.num_inference_steps / denoise)

    def _free_accelerator_memory(self, exc: BaseException) -> None:
        """After an OOM: drop what pins the failed step's tensors (the frames of the exception's traceback
        and of the exceptions chained to it hold the forward's activations), collect, then hand the cached
        blocks back to the device. `empty_cache()` alone frees nothing while those references live."""
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)  # frames still executing (ours) are left as they are
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        gc.collect()
        if self.rt.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
