"""Server-Sent Events for `GET /v1/videos/{id}/events`: one event per change of (status, stage, progress).

The stream polls the job (one Redis HGETALL per `poll_interval`) instead of subscribing to pub/sub: the job
hash is already the single source of truth, polling survives Redis restarts and worker crashes without any
extra channel, and a change is seen within one interval. Each event carries the full public job as `data`,
so a client that reconnects needs only the newest event, never a replay of deltas.

Event ids: the job's `version` when it has one (a counter its writer bumps), else its `updated_at` (or
`created_at`) in microseconds since the epoch - every transition and progress update rewrites
`updated_at`, so ids grow with the job's history. Within one stream ids are forced strictly increasing
(a skewed clock between API and worker hosts cannot make them go back). On reconnect with `Last-Event-ID`
the current state is sent only if its id differs from that one, i.e. if the client has not seen it.
The stream ends after the event for a terminal status, when the job disappears, or after `max_seconds`
(the client reconnects with Last-Event-ID; this bounds how long one connection holds a server slot).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
KEEPALIVE = ": keep-alive\n\n"

Job = Mapping[str, Any]
GetJob = Callable[[str], Job | None]


def format_sse(event_id: int | str, event: str, data_json: str, retry_ms: int | None = None) -> str:
    """One SSE message. Multi-line data becomes several `data:` lines, as the spec requires."""
    lines = [f"retry: {retry_ms}"] if retry_ms is not None else []
    lines += [f"id: {event_id}", f"event: {event}"]
    lines += [f"data: {line}" for line in data_json.split("\n")]
    return "\n".join(lines) + "\n\n"


def _micros(value: Any) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return int(value.timestamp() * 1_000_000) if isinstance(value, datetime) else int(value)


def event_id_of(job: Job) -> int:
    if job.get("version") is not None:
        return int(job["version"])
    return _micros(job.get("updated_at") or job["created_at"])


def parse_last_event_id(header: str | None) -> int | None:
    """The `Last-Event-ID` header as an int; None when absent or not ours (then the client gets the current state)."""
    try:
        return int(header) if header else None
    except ValueError:
        return None


class _Tracker:
    """What has been sent on one stream; turns each polled snapshot into the messages to send now."""

    def __init__(self, last_event_id: int | None, keepalive_interval: float, now: float) -> None:
        self.resume_id = last_event_id
        self.last_id = last_event_id
        self.last_key: tuple[Any, Any, Any] | None = None
        self.last_sent = now
        self.keepalive_interval = keepalive_interval
        self.done = False

    def step(self, job: Job | None, now: float) -> list[str]:
        if job is None:  # expired or deleted: nothing more will happen
            self.done = True
            return []
        key = (job.get("status"), job.get("stage"), job.get("progress"))
        out = []
        event_id = event_id_of(job)
        fresh = self.last_key is None and event_id != self.resume_id
        if fresh or (self.last_key is not None and key != self.last_key):
            if self.last_id is not None and event_id <= self.last_id:
                event_id = self.last_id + 1
            out.append(format_sse(event_id, "job", json.dumps(job, default=str, separators=(",", ":"))))
            self.last_id = event_id
        self.last_key = key
        if job.get("status") in TERMINAL:
            self.done = True
        elif out:
            self.last_sent = now
        elif now - self.last_sent >= self.keepalive_interval:
            out.append(KEEPALIVE)
            self.last_sent = now
        return out


def job_event_stream(
    get_job: GetJob,
    job_id: str,
    last_event_id: int | None = None,
    poll_interval: float = 0.5,
    keepalive_interval: float = 15.0,
    max_seconds: float = 300.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[str]:
    """Yield SSE text for `job_id` until it is terminal, gone, or `max_seconds` have passed."""
    start = clock()
    tracker = _Tracker(last_event_id, keepalive_interval, start)
    while True:
        yield from tracker.step(get_job(job_id), clock())
        if tracker.done or clock() - start >= max_seconds:
            return
        sleep(poll_interval)


async def ajob_event_stream(
    get_job: GetJob,
    job_id: str,
    last_event_id: int | None = None,
    poll_interval: float = 0.5,
    keepalive_interval: float = 15.0,
    max_seconds: float = 300.0,
) -> AsyncIterator[str]:
    """The same stream for an async route: the blocking `get_job` runs in a worker thread for each poll
    only, so an open stream holds no thread between polls (a sync generator would hold one throughout)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tracker = _Tracker(last_event_id, keepalive_interval, start)
    while True:
        job = await asyncio.to_thread(get_job, job_id)
        for message in tracker.step(job, loop.time()):
            yield message
        if tracker.done or loop.time() - start >= max_seconds:
            return
        await asyncio.sleep(poll_interval)
