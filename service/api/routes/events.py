"""`GET /v1/videos/{id}/events`: Server-Sent Events of a job's status and progress (service/api/events.py).

The job is loaded through the same tenant check as every job route (404 for another tenant's job) before
the stream opens; each event's `data` is the public job object, its `id` the job's `version`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from service.api import events
from service.api.deps import RedisDep, SettingsDep, TenantDep
from service.api.routes.responses import errors
from service.api.routes.videos import JobId, load, present
from service.jobs import jobstore

router = APIRouter(tags=["videos"])
logger = logging.getLogger(__name__)

RETRY_MS = 2000  # what a disconnected EventSource waits before reconnecting


@router.get(
    "/v1/videos/{job_id}/events",
    summary="Live events of a job (Server-Sent Events)",
    description=(
        "A `text/event-stream`: one `job` event (data: the job object, id: its `version`) whenever status, "
        "stage or progress changes, `: keep-alive` comments while nothing does, and the end of the stream "
        "after a terminal status. Reconnect with `Last-Event-ID` to receive only what is newer. A stream is "
        "closed after BORA_EVENTS_MAX_SECONDS; reconnecting resumes it."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The event stream."}, **errors(404, 422, 503)},
)
def job_events(
    job_id: JobId,
    settings: SettingsDep,
    r: RedisDep,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header(max_length=64, description="Resume after this event id.")] = None,
) -> StreamingResponse:
    load(r, job_id, settings, tenant)  # 404 (another tenant's job too) and 503 happen here, before streaming

    def get_job(jid: str) -> dict[str, Any] | None:
        record = jobstore.get(r, jid, prefix=settings.key_prefix)
        if record is None or record.tenant != tenant:
            return None
        return present(record, settings).model_dump(mode="json")

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        try:
            async for message in events.ajob_event_stream(
                get_job,
                job_id,
                events.parse_last_event_id(last_event_id),
                poll_interval=settings.events_poll_interval_seconds,
                keepalive_interval=settings.events_keepalive_seconds,
                max_seconds=settings.events_max_seconds,
            ):
                yield message
        except RedisError as exc:  # the client reconnects with Last-Event-ID once Redis is back
            logger.warning("event stream ended: Redis unavailable", extra={"job_id": job_id, "error": str(exc)})

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
