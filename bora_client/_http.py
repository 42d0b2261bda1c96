"""What the sync and async clients share and that does no I/O: settings, the retry policy, the SSE parser,
the progress bar. Each client does its own I/O with these (httpx.Client / httpx.AsyncClient)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from bora_client.errors import APIStatusError
from bora_client.models import Job

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
USER_AGENT = "bora-client/0.1"
# 429 and 503 are the service saying "not now"; 502/504 come from a proxy in front of it. A 409 with one of
# these codes is a "not yet" too: a retry racing our own first attempt (the same Idempotency-Key still being
# written), or a DELETE of a running job that is still stopping.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_CONFLICT_CODES = frozenset({"idempotency_key_in_use", "job_stopping"})


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("BORA_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get("BORA_API_KEY") or None)


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` retries after the first attempt. A `Retry-After` is honoured exactly; one longer than
    `max_wait` is not waited out (the error is raised, with `retry_after` set). Without one: exponential
    backoff from `backoff` seconds, doubling up to `max_backoff`, with jitter."""

    max_retries: int = 5
    max_wait: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 8.0

    def retryable(self, error: APIStatusError) -> bool:
        return error.status_code in RETRY_STATUSES or (
            error.status_code == 409 and error.code in RETRY_CONFLICT_CODES
        )

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number `attempt` (1-based), or None: give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_wait else None
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)


@dataclass
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """Incremental `text/event-stream` parser (WHATWG HTML §9.2.6): feed it lines, get events. Remembers the
    last event id (for `Last-Event-ID`) and the server's `retry:` reconnection delay."""

    def __init__(self, last_event_id: str | None = None, retry_ms: int = 2000) -> None:
        self.last_event_id = last_event_id
        self.retry_ms = retry_ms
        self._data: list[str] = []
        self._event = ""

    def feed(self, line: str) -> ServerSentEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent("\n".join(self._data), self._event or "message", self.last_event_id)
        self._data, self._event = [], ""
        return event

    def events(self, lines: Iterable[str]) -> Iterator[ServerSentEvent]:
        for line in lines:
            event = self.feed(line)
            if event is not None:
                yield event


def describe(job: Job) -> str:
    """One line about where a job is: `queued #2 · eta 12s`, `denoising 4/10 · eta 3s`, `succeeded`."""
    parts: list[str] = []
    if job.status == "queued":
        parts.append(f"queued #{job.queue_position}" if job.queue_position else "queued")
    elif job.terminal:
        parts.append(job.status + (f" ({job.error.code})" if job.error and job.status == "failed" else ""))
    else:
        stage = job.stage or job.status
        if job.status == "canceling":
            stage = f"canceling ({stage})"
        if job.step is not None and job.total_steps:
            stage += f" {job.step}/{job.total_steps}"
        parts.append(stage)
    if job.eta_seconds is not None and not job.terminal:
        parts.append(f"eta {job.eta_seconds:.0f}s")
    return " · ".join(parts)


class ProgressBar:
    """A tqdm bar for `wait(progress=True)`: percent done, and stage, step, queue position and ETA beside it."""

    def __init__(self, job_id: str) -> None:
        from tqdm.auto import tqdm

        self._bar: Any = tqdm(
            total=100, desc=job_id[:12], unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}"
        )

    def update(self, job: Job) -> None:
        self._bar.n = min(max(job.progress, 0.0), 100.0)
        self._bar.set_postfix_str(describe(job), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def error_of(status_code: int, headers: Any, content: bytes) -> APIStatusError:
    return APIStatusError.from_response(status_code, headers, content)


def is_event_stream(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "text/event-stream"
