"""`/v1/videos`: submit, read, list, cancel, delete, and download a job's video or thumbnail."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import RedirectResponse
from redis import Redis

from service.api.deps import (
    CallerDep,
    RedisDep,
    RequestIdDep,
    SettingsDep,
    StorageDep,
    TenantDep,
)
from service.api.errors import Conflict, InvalidRequest, NotFound
from service.api.files import StoredFileResponse
from service.api.routes.responses import errors, json_answer
from service.jobs import deletion, idempotency, jobstore, queueing, webhooks
from service.jobs.audit import audit
from service.jobs.config import Settings
from service.jobs.errors import JobNotFound
from service.jobs.inputs import normalize
from service.jobs.schemas import (
    DEFAULT_WEBHOOK_EVENTS,
    JobList,
    JobRecord,
    JobStatus,
    Stage,
    VideoCreate,
    VideoJob,
    Webhook,
    WebhookCreate,
    utcnow,
)

router = APIRouter(tags=["videos"])
logger = logging.getLogger(__name__)

MAX_SEED_DRAWN = 2**31 - 1
JobId = Annotated[str, Path(description="The job id returned at submission (`vid_…`).")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[!-~]{1,255}$",
        description="Makes a retried submission safe: the same key with the same body returns the job the first "
        "request created (202, `Idempotent-Replayed: true`) instead of creating another; with another body, 409. "
        "Keys are kept 24 h per tenant. 1-255 printable ASCII characters, e.g. a UUID.",
    ),
]
IDEMPOTENCY_GRACE_SECONDS = 30  # a claimed key whose job never appeared after this long is free again


def present(record: JobRecord, settings: Settings) -> VideoJob:
    """The public view of a job; output URLs become absolute when BORA_PUBLIC_BASE_URL is set."""
    job = record.public()
    base = (settings.public_base_url or "").rstrip("/")
    if base and job.outputs is not None:
        outputs = job.outputs.model_copy(deep=True)
        for output in (outputs.video, outputs.thumbnail, outputs.sidecar):
            if output is not None and output.url.startswith("/"):
                output.url = base + output.url
        job = job.model_copy(update={"outputs": outputs})
    return job


def accept_webhook(hook: WebhookCreate, settings: Settings) -> Webhook:
    """The request's webhook, checked against the destination allowlist now (422), not at delivery time."""
    param = "body.webhook.url"
    if not settings.webhook_hosts:
        raise InvalidRequest(
            "webhooks are off on this server: its destination allowlist (BORA_WEBHOOK_ALLOWED_HOSTS) is empty",
            code="webhook_not_allowed",
            param=param,
        )
    try:
        url = webhooks.check_destination(hook.url, settings.webhook_hosts, settings.webhook_allow_http_loopback)
    except webhooks.DestinationRejected as exc:
        raise InvalidRequest(
            f"{exc}: webhooks go only to https URLs on hosts the operator allowlisted", code="webhook_not_allowed",
            param=param,
        ) from None
    events = list(dict.fromkeys(hook.events)) if hook.events else list(DEFAULT_WEBHOOK_EVENTS)
    return Webhook(url=url, events=events)  # type: ignore[arg-type]


def load(r: Redis, job_id: str, settings: Settings, tenant: str | None) -> JobRecord:
    """The caller's job, or 404 — also for another tenant's job, so ids leak nothing. An id that isn't one of
    ours never reaches Redis (`vid_…:webhooks` would otherwise name another key of the job)."""
    record = jobstore.get(r, job_id, prefix=settings.key_prefix) if jobstore.JOB_ID.fullmatch(job_id) else None
    return owned(record, job_id, tenant)


def owned(record: JobRecord | None, job_id: str, tenant: str | None) -> JobRecord:
    if record is None or record.tenant != tenant:
        raise JobNotFound(f"no job {job_id}", param="job_id")
    return record


@router.post(
    "/v1/videos",
    status_code=202,
    response_model=VideoJob,
    summary="Submit a video job",
    responses=errors(400, 409, 413, 415, 422, 429, 503),
    response_description="Accepted: the job object; `Location` points at it. Poll it until it is terminal.",
)
@router.post(
    "/generate",
    status_code=202,
    response_model=VideoJob,
    summary="Submit a video job (alias of POST /v1/videos)",
    responses=errors(400, 409, 413, 415, 422, 429, 503),
)
async def create_video(body: VideoCreate, caller: CallerDep, idempotency_key: IdempotencyKey = None) -> Response:
    api, tenant, request_id = caller.api, caller.tenant, caller.request_id
    settings, spec = api.settings, api.model_spec
    # A request that is invalid (422) never reaches Redis; a replay of an accepted one spends no rate-limit token.
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED_DRAWN + 1)
    normalized, warnings = normalize(
        body,
        spec,
        seed,
        max_prompt_chars=settings.max_prompt_chars,
        max_metadata_bytes=settings.max_metadata_bytes,
    )
    webhook = accept_webhook(body.webhook, settings) if body.webhook is not None else None
    if body.timeout_seconds is not None and body.timeout_seconds > settings.job_timeout_seconds:
        raise InvalidRequest(
            f"timeout_seconds must be at most {settings.job_timeout_seconds} on this server",
            param="body.timeout_seconds",
        )
    now = utcnow()
    record = JobRecord(
        id=jobstore.new_job_id(),
        status=JobStatus.queued,
        stage=Stage.queued,
        created_at=now,
        updated_at=now,
        model=spec.name,
        input=normalized,
        seed=seed,
        warnings=warnings,
        metadata=body.metadata,
        webhook=webhook,
        tenant=tenant,
        request_id=request_id,
        retention_s=settings.job_retention_seconds,
        store_prompt=settings.store_prompt,
        idempotency_key=idempotency_key,
        timeout_seconds=queueing.run_limit(settings, body.timeout_seconds),
    )
    base_url = (settings.public_base_url or "").rstrip("/")
    claim = None
    if idempotency_key is not None:
        fingerprint = idempotency.body_sha256(body.model_dump(mode="json", exclude_unset=True))
        ttl = min(idempotency.TTL_SECONDS, settings.job_retention_seconds)  # never outlive the job it names
        claim = idempotency.claim(settings.key_prefix, tenant, idempotency_key, fingerprint, ttl)
    # One Lua script, one round trip (service/jobs/jobstore.py `create`): a replay of the Idempotency-Key, the
    # rate limit and queue caps (429), then the job record, its claim and its RQ entry - all of them, or none.
    # A lost reply is safe to repeat: the retry finds the job it created. Awaited on the event loop: an async
    # route holds no thread, where a `def` route costs two thread hops (the route, then its response).
    stored, was_replay = await jobstore.create_async(
        api.aredis,
        record,
        prefix=settings.key_prefix,
        rq_entry=queueing.rq_entry(api.queue, settings, queueing.payload_of(record)),
        claim=claim,
        limits=api.limits,
        queued_expiry_seconds=settings.queued_expiry_seconds,
        deadline_seconds=queueing.queued_deadline(settings, record.timeout_seconds),
    )
    headers = {"Location": f"{base_url}/v1/videos/{stored.id}"}
    if was_replay:  # an earlier request with this key created the job
        headers["Idempotent-Replayed"] = "true"
    else:
        api.metrics.jobs_submitted.labels(spec.name).inc()
        audit("job.created", record, outcome="queued", request_id=request_id, webhook=webhook is not None)
    return json_answer(present(stored, settings), status_code=202, headers=headers)


@router.get("/v1/videos", response_model=JobList, summary="List jobs, newest first", responses=errors(422, 503))
def list_videos(
    settings: SettingsDep,
    r: RedisDep,
    tenant: TenantDep,
    limit: Annotated[int | None, Query(ge=1, description="Page size (default 20, at most BORA_LIST_MAX_LIMIT).")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> JobList:
    if limit is None:
        limit = settings.list_default_limit
    if limit > settings.list_max_limit:
        raise InvalidRequest(f"limit must be at most {settings.list_max_limit}", param="query.limit")
    records, next_cursor = jobstore.list_jobs(r, limit, cursor, tenant, prefix=settings.key_prefix)
    return JobList(
        # The tenant's own index; the filter is a second guard that another tenant's job is never shown.
        data=[present(record, settings) for record in records if record.tenant == tenant],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )


@router.get("/v1/videos/{job_id}", response_model=VideoJob, summary="Get a job", responses=errors(404, 422, 503))
async def get_video(job_id: JobId, caller: CallerDep) -> Response:
    api = caller.api
    prefix = api.settings.key_prefix
    record = await jobstore.get_async(api.aredis, job_id, prefix=prefix) if jobstore.JOB_ID.fullmatch(job_id) else None
    return json_answer(present(owned(record, job_id, caller.tenant), api.settings))


@router.post(
    "/v1/videos/{job_id}/cancel",
    response_model=VideoJob,
    summary="Cancel a job",
    description=(
        "A queued job becomes `canceled` at once and never runs. A running job becomes `canceling`; the worker "
        "stops between denoising steps and marks it `canceled`. Cancelling a job that is already canceling or "
        "canceled answers it unchanged (safe to retry); a succeeded or failed job answers 409."
    ),
    responses=errors(404, 409, 422, 503),
)
def cancel_video(
    job_id: JobId,
    settings: SettingsDep,
    r: RedisDep,
    tenant: TenantDep,
    request_id: RequestIdDep,
) -> VideoJob:
    load(r, job_id, settings, tenant)
    actor = f"api:{request_id or secrets.token_hex(8)}"
    record, changed = jobstore.request_cancel(r, job_id, prefix=settings.key_prefix, actor=actor)
    if changed:  # a repeated cancel answers the same, but is audited (and notified) once
        event = "job.canceled" if record.status == JobStatus.canceled else "job.cancel_requested"
        audit(event, record, outcome=record.status.value, request_id=request_id)
    return present(record, settings)


@router.delete(
    "/v1/videos/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a job and everything stored for it",
    description=(
        "Removes the job record, its video, thumbnail and metadata from storage, and its Idempotency-Key entry; "
        "writes an audit line. A queued or running job is canceled first; a running job that has not stopped "
        "within a few seconds answers 409 `job_stopping` with `Retry-After` (repeat the DELETE). Afterwards "
        "every route answers 404 for the id."
    ),
    responses={204: {"description": "Deleted."}, **errors(404, 409, 422, 503)},
)
def delete_video(
    job_id: JobId, settings: SettingsDep, r: RedisDep, storage: StorageDep, tenant: TenantDep,
    request_id: RequestIdDep,
) -> Response:
    record = load(r, job_id, settings, tenant)
    status = record.status.value
    record = deletion.delete_job(r, storage, record, prefix=settings.key_prefix)
    audit("job.deleted", record, outcome="deleted", request_id=request_id, previous_status=status)
    return Response(status_code=204)


@router.head("/v1/videos/{job_id}/content", include_in_schema=False)
@router.get(
    "/v1/videos/{job_id}/content",
    summary="Download the video (or its thumbnail)",
    description=(
        "Local storage: the MP4 itself, with HTTP Range support. S3: a 307 redirect to a URL presigned on "
        "every call, so a link taken from here never expires under the client."
    ),
    response_class=Response,
    responses={
        200: {"content": {"video/mp4": {}, "image/jpeg": {}, "application/json": {}}, "description": "The file."},
        206: {"description": "Partial content (Range)."},
        304: {"description": "Not modified: `If-None-Match` named the current ETag."},
        307: {"description": "Redirect to a presigned object-storage URL."},
        **errors(404, 409, 416, 422, 503),
    },
)
def get_video_content(
    job_id: JobId,
    settings: SettingsDep,
    r: RedisDep,
    storage: StorageDep,
    tenant: TenantDep,
    variant: Annotated[
        Literal["video", "thumbnail", "metadata"],
        Query(description="`thumbnail`: a JPEG poster frame; `metadata`: the JSON sidecar."),
    ] = "video",
) -> Response:
    record = load(r, job_id, settings, tenant)
    if record.status != JobStatus.succeeded or record.outputs is None:
        code = "video_not_ready" if not record.status.terminal else "video_unavailable"
        raise Conflict(f"job {job_id} is {record.status.value}; content exists only once it succeeded", code=code)
    output = getattr(record.outputs, "sidecar" if variant == "metadata" else variant)
    if output is None:
        raise NotFound(f"job {job_id} has no {variant}", code="content_not_found", param="variant")
    filename = {"video": f"{job_id}.mp4", "thumbnail": f"{job_id}-thumbnail.jpg",
                "metadata": f"{job_id}-metadata.json"}[variant]
    url = storage.presigned_url(output.key, settings.presign_ttl_seconds, filename=filename)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    path = storage.local_path(output.key)
    if path is None or not path.is_file():
        raise NotFound(f"the {variant} of job {job_id} is missing from storage", code="content_missing")
    headers = {"Cache-Control": "private, max-age=3600"}
    if output.sha256:  # a strong validator: the content never changes under its key
        headers["ETag"] = f'"{output.sha256}"'
    return StoredFileResponse(
        path, media_type=output.content_type, filename=filename, content_disposition_type="inline", headers=headers
    )
