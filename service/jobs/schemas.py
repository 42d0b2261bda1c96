"""The job contract shared by the API and the worker (torch-free): request, payload, state, public job object.

Flow: a client POSTs a `VideoCreate`; the API checks it against the served model (service/jobs/models.py), fills
every default into a `VideoInput`, stores a `JobRecord` (service/jobs/jobstore.py) and enqueues a `JobPayload`
dict on RQ. The worker re-validates the payload with `JobPayload.model_validate(...)`, and reports progress
and results back only through service/jobs/jobstore.py. Clients read `VideoJob`.

Redis keeps one hash field per top-level attribute of `JobRecord`; nested values are JSON (see jobstore).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.jobs.models import ENVELOPE, SIZE_MULTIPLE, Sampler

SCHEMA_VERSION = 1
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    canceling = "canceling"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


class Stage(StrEnum):
    queued = "queued"
    loading = "loading"
    encoding_text = "encoding_text"
    denoising = "denoising"
    decoding = "decoding"
    encoding_video = "encoding_video"
    uploading = "uploading"


class ErrorCode(StrEnum):
    """Why a job failed (`VideoJob.error.code`)."""

    invalid_input = "invalid_input"
    out_of_memory = "out_of_memory"
    numerical_error = "numerical_error"
    storage_error = "storage_error"
    timeout = "timeout"
    internal = "internal"
    worker_lost = "worker_lost"
    expired = "expired"
    canceled = "canceled"


WebhookEvent = Literal["video.started", "video.progress", "video.succeeded", "video.failed", "video.canceled"]
WEBHOOK_EVENTS: tuple[str, ...] = (
    "video.started", "video.progress", "video.succeeded", "video.failed", "video.canceled"
)
# `video.progress` (up to one per 10 % of progress) is opt-in: it is the chatty one.
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("video.started", "video.succeeded", "video.failed", "video.canceled")
MAX_WEBHOOK_URL_CHARS = 2048

def _no_nul(text: str) -> str:
    """NUL can't travel through C strings (ffmpeg arguments, many log and text tools): refuse it at the door."""
    if "\x00" in text:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return text


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS)]
Side = Annotated[int, Field(strict=True, ge=ENVELOPE.min_side, le=ENVELOPE.max_side, multiple_of=SIZE_MULTIPLE)]


class WebhookCreate(BaseModel):
    """Where to POST signed notifications of this job's state changes (Standard Webhooks)."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, StringConstraints(min_length=1, max_length=MAX_WEBHOOK_URL_CHARS)] = Field(
        description="https URL whose host is in the server's webhook allowlist (BORA_WEBHOOK_ALLOWED_HOSTS)."
    )
    events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="Events to send; default every one except `video.progress`.",
    )


class Webhook(BaseModel):
    """A job's webhook as stored and shown: the URL and the events it receives."""

    url: str
    events: list[WebhookEvent]


class VideoCreate(BaseModel):
    """Request body of `POST /v1/videos`. Left-out fields take the served model's defaults.

    Static bounds here are the envelope of every model's bounds (service/jobs/models.py: `ENVELOPE`); the
    served model narrows them (still a 422).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "A beating human heart, cross-section, ultrasound style", "num_frames": 16, "seed": 42}
            ]
        },
    )

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_no_nul)] = Field(
        description="What the video shows. Cut at the text encoder's 120 tokens (a warning says so)."
    )
    num_frames: Annotated[int, Field(strict=True, ge=1, le=ENVELOPE.max_frames)] | None = Field(
        None, description="Frames to generate; the model's limit applies."
    )
    height: Side | None = Field(
        None, description="Pixels, a multiple of 16 (VAE ×8, patch ×2)."
    )
    width: Side | None = Field(
        None, description="Pixels, a multiple of 16 (VAE ×8, patch ×2)."
    )
    fps: Annotated[int, Field(strict=True, ge=1, le=60)] | None = Field(None, description="Frames per second of the MP4.")
    num_inference_steps: Annotated[int, Field(strict=True, ge=1, le=ENVELOPE.max_steps)] | None = Field(
        None, description="Denoising steps; the model's limit per sampler applies."
    )
    guidance_scale: Annotated[float, Field(ge=0.0, le=ENVELOPE.max_guidance, allow_inf_nan=False)] | None = Field(
        None, description="Classifier-free guidance scale."
    )
    sampler: Sampler | None = Field(None, description="`iddpm` (upstream), `ddim` or `dpm-solver++`.")
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] | None = Field(
        None, description="Random seed; one is drawn when absent. The seed used is always returned."
    )
    model: str | None = Field(None, max_length=64, description="Model preset; must be the one this server serves.")
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None, max_length=MAX_METADATA_KEYS, description="Small free-form client reference, echoed back."
    )
    webhook: WebhookCreate | None = Field(
        None, description="Signed POSTs on state changes; the secret is `GET /v1/webhook-secret`."
    )
    timeout_seconds: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="Run-time limit of the job; at most (and by default) the server's BORA_JOB_TIMEOUT_SECONDS."
    )


class VideoInput(BaseModel):
    """A request with every default filled in: exactly what the worker generates."""

    prompt: str | None = Field(
        description="null once the job has ended on a server that keeps only the prompt's hash (BORA_STORE_PROMPT=false)."
    )
    prompt_sha256: str | None = Field(None, description="Hex SHA-256 of the prompt's UTF-8 bytes.")
    num_frames: int
    height: int
    width: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    sampler: Sampler
    seed: int

    @model_validator(mode="after")
    def _hash_prompt(self) -> VideoInput:
        if self.prompt is not None:
            self.prompt_sha256 = hashlib.sha256(self.prompt.encode()).hexdigest()
        return self

    def params(self) -> dict[str, Any]:
        """Everything but the prompt (what audit lines and the sidecar list as the job's parameters)."""
        return self.model_dump(mode="json", exclude={"prompt", "prompt_sha256"})

    def without_prompt(self) -> VideoInput:
        return self.model_copy(update={"prompt": None})


class JobWarning(BaseModel):
    code: str = Field(description="e.g. `prompt_truncated`, `untrained_shape`.")
    message: str
    param: str | None = None


class JobError(BaseModel):
    code: ErrorCode
    message: str
    retryable: bool = False


class FileOutput(BaseModel):
    """A stored object. `key` is the storage key (never an expiring URL); `url` is the API path serving it."""

    url: str
    key: str
    bytes: int
    content_type: str
    sha256: str | None = None


class VideoOutput(FileOutput):
    width: int
    height: int
    frames: int
    fps: int
    duration_s: float


class ImageOutput(FileOutput):
    width: int
    height: int


class Outputs(BaseModel):
    video: VideoOutput
    thumbnail: ImageOutput | None = None
    sidecar: FileOutput | None = Field(None, description="JSON: prompt, params, seed, model, timings, label.")


class Timings(BaseModel):
    """Seconds. `inference_s` covers text encoding + denoising + decoding."""

    queue_wait_s: float | None = None
    load_s: float | None = None
    encoding_text_s: float | None = None
    denoising_s: float | None = None
    decoding_s: float | None = None
    inference_s: float | None = None
    encode_s: float | None = None
    upload_s: float | None = None
    total_s: float | None = None


class VideoJob(BaseModel):
    """The public job object (`GET /v1/videos/{id}`)."""

    id: str
    object: Literal["video"] = "video"
    status: JobStatus
    stage: Stage | None = Field(
        None, description="What the job is doing; once it has ended, the last stage it reached (where it failed)."
    )
    progress: float = Field(0.0, ge=0, le=100, description="0–100.")
    step: int | None = None
    total_steps: int | None = None
    queue_position: int | None = Field(None, description="While queued: 1 = next to run.")
    eta_seconds: float | None = Field(
        None, description="Rough estimate of the seconds until completion (on reads, not in the submission's 202)."
    )
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime | None = None
    model: str
    weights_sha256: str | None = None
    input: VideoInput
    seed: int
    warnings: list[JobWarning] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    outputs: Outputs | None = None
    timings: Timings | None = None
    error: JobError | None = None
    webhook: Webhook | None = None
    timeout_seconds: int | None = Field(None, description="Run-time limit: past it the job fails `timeout`.")
    version: int = Field(0, ge=0, description="Bumped by every change of the job; the id of its live events.")


class JobRecord(VideoJob):
    """What Redis holds: the public job plus fields clients never see."""

    tenant: str | None = None
    request_id: str | None = None
    worker_id: str | None = None
    run_token: str | None = Field(None, description="`{worker_id}:{attempt}` of the run that owns the job.")
    attempts: int = 0
    retention_s: int = 604800
    idempotency_key: str | None = Field(None, description="The submission's key, so deleting the job drops it.")
    store_prompt: bool = Field(
        True, description="False: the terminal transition keeps only the prompt's sha256 (BORA_STORE_PROMPT)."
    )

    def without_prompt(self) -> JobRecord:
        return self.model_copy(update={"input": self.input.without_prompt()})

    def public(self) -> VideoJob:
        return VideoJob.model_validate(self.model_dump(include=set(VideoJob.model_fields)))


class JobPayload(BaseModel):
    """What is enqueued to RQ (as `model_dump(mode="json")`) for `worker.jobs.run_video_job(payload)`."""

    model_config = ConfigDict(extra="forbid")

    version: int = SCHEMA_VERSION
    job_id: str
    input: VideoInput
    seed: int
    model: str
    request_id: str | None = None
    tenant: str | None = None
    metadata: dict[str, str] | None = None
    enqueued_at: datetime | None = None
    timeout_seconds: int | None = None

    @model_validator(mode="after")
    def _has_prompt(self) -> JobPayload:
        if self.input.prompt is None:
            raise ValueError("input.prompt is required: the worker cannot generate from a hash")
        return self


class WebhookAttempt(BaseModel):
    """One delivery attempt of one webhook message (`msg_id` is the same for every retry of a message)."""

    attempt: int
    at: datetime
    event: str
    msg_id: str
    ok: bool
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    next_attempt_in_s: float | None = Field(None, description="Seconds until the retry; null: no retry.")


class WebhookAttemptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookAttempt] = Field(description="Oldest first; the last 100 are kept.")


class WebhookSecret(BaseModel):
    """The caller's webhook signing secret (`whsec_…`), for verifying our `webhook-signature` headers."""

    object: Literal["webhook_secret"] = "webhook_secret"
    tenant: str | None = None
    secret: str


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next (older) page.")
    has_more: bool = False


class WorkerState(StrEnum):
    starting = "starting"
    loading = "loading"
    ready = "ready"
    busy = "busy"
    stopping = "stopping"
    failed = "failed"


class WorkerHeartbeat(BaseModel):
    """`P:worker:{wid}` hash, refreshed by the worker every few seconds with a TTL (service/jobs/heartbeats.py)."""

    worker_id: str
    state: WorkerState
    model: str | None = None
    weights_sha256: str | None = None
    device: str | None = None
    dtype: str | None = None
    current_job: str | None = None
    pid: int | None = None
    hostname: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    detail: str | None = Field(None, description="Why the worker is failed/stopping, if known.")


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


def content_url(job_id: str, variant: str | None = None) -> str:
    """API path serving a job's output (what `FileOutput.url` holds); stable, never expires."""
    path = f"/v1/videos/{job_id}/content"
    return f"{path}?variant={variant}" if variant else path

