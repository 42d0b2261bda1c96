"""The API's objects as the client reads them, written from the service's OpenAPI document.

They are the client's own (not imported from `service`), so the client installs and imports without the
server's dependencies, and they are lenient: fields a newer server adds are kept (`extra="allow"`), and
status/stage values are plain strings, so an older client never fails on a value it does not know.
tests/client checks them against the running service's OpenAPI schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
VARIANTS = ("video", "thumbnail", "metadata")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class FileOutput(_Model):
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


class Outputs(_Model):
    video: VideoOutput
    thumbnail: ImageOutput | None = None
    sidecar: FileOutput | None = None

    def of(self, variant: str) -> FileOutput | None:
        """The output a `variant` of `GET /v1/videos/{id}/content` serves (`metadata` is the sidecar)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        return getattr(self, "sidecar" if variant == "metadata" else variant)


class VideoInput(_Model):
    """The request with every default filled in: what the worker generates."""

    prompt: str | None  # null once ended on a server that keeps only the hash (BORA_STORE_PROMPT=false)
    prompt_sha256: str | None = None
    num_frames: int
    height: int
    width: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    sampler: str
    seed: int


class JobWarning(_Model):
    code: str
    message: str
    param: str | None = None


class JobError(_Model):
    code: str
    message: str
    retryable: bool = False


class Timings(_Model):
    queue_wait_s: float | None = None
    load_s: float | None = None
    encoding_text_s: float | None = None
    denoising_s: float | None = None
    decoding_s: float | None = None
    inference_s: float | None = None
    encode_s: float | None = None
    upload_s: float | None = None
    total_s: float | None = None


class Webhook(_Model):
    url: str
    events: list[str]


class Job(_Model):
    """A video job (`GET /v1/videos/{id}`). `status`: queued, running, canceling, succeeded, failed, canceled."""

    id: str
    object: str = "video"
    status: str
    stage: str | None = None
    progress: float = 0.0
    step: int | None = None
    total_steps: int | None = None
    queue_position: int | None = None
    eta_seconds: float | None = None
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
    timeout_seconds: int | None = None  # the run-time limit; past it the job fails `timeout`
    version: int = 0

    @property
    def terminal(self) -> bool:
        """True once the job has ended (succeeded, failed or canceled); it never changes again."""
        return self.status in TERMINAL_STATUSES


class JobList(_Model):
    object: str = "list"
    data: list[Job]
    next_cursor: str | None = None
    has_more: bool = False


def job_id_of(job: Job | str) -> str:
    """Methods take a job or its id."""
    if isinstance(job, Job):
        return job.id
    if isinstance(job, str) and job:
        return job
    raise TypeError(f"expected a Job or a job id, not {type(job).__name__}")


def create_body(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of `POST /v1/videos`; parameters left as None take the served model's defaults."""
    return {"prompt": prompt, **{name: value for name, value in params.items() if value is not None}}
