"""The synchronous client: `Client(base_url, api_key)`; see the package docstring for a walk-through."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bora_client._http import (
    ProgressBar,
    RetryPolicy,
    SSEParser,
    default_headers,
    error_of,
    is_event_stream,
    resolve_api_key,
    resolve_base_url,
)
from bora_client.errors import (
    APIConnectionError,
    ChecksumMismatchError,
    NotFoundError,
    WaitTimeoutError,
)
from bora_client.models import Job, JobList, create_body, job_id_of

STREAM_READ_TIMEOUT = 60.0  # the server sends a keep-alive every 15 s: this long without a byte = a dead stream
MAX_STREAM_FAILURES = 5  # consecutive failed event-stream connections before `wait` falls back to polling


class Client:
    """Talks to one Bora service. Arguments default to the environment: `BORA_BASE_URL` (else
    http://127.0.0.1:8000) and `BORA_API_KEY` (none: a server with auth off)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        max_retry_wait: float = 60.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._headers = default_headers(resolve_api_key(api_key))
        self._timeout = timeout

    # -- plumbing -----------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One API call with retries (429/503 honouring Retry-After, transport errors with backoff).
        Every call this client makes is safe to repeat: a POST /v1/videos carries its Idempotency-Key."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(
                    method, self._url(path), json=json, params=params, headers={**self._headers, **(headers or {})}
                )
            except httpx.TransportError as exc:
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                time.sleep(wait)
                continue
            if response.status_code < 400:
                return response
            error = error_of(response.status_code, response.headers, response.content)
            if isinstance(error, NotFoundError) and method == "DELETE" and attempt > 1:
                return response  # an earlier attempt deleted it and its answer was lost
            wait = self.retry.delay(attempt, error.retry_after) if self.retry.retryable(error) else None
            if wait is None:
                raise error
            time.sleep(wait)

    # -- jobs ---------------------------------------------------------------------------------------------

    def create(
        self,
        prompt: str,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        webhook: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a job (`POST /v1/videos`) and return it, queued. Left-out parameters take the served model's
        defaults. A fresh Idempotency-Key is sent unless given; every retry (429, 503, a lost connection)
        reuses it, so however often the request is retried, one job is created."""
        params = dict(num_frames=num_frames, height=height, width=width, fps=fps,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                      seed=seed, model=model, metadata=metadata, webhook=webhook)
        key = idempotency_key or str(uuid.uuid4())
        response = self._request("POST", "/v1/videos", json=create_body(prompt, params),
                                 headers={"Idempotency-Key": key})
        return Job.model_validate_json(response.content)

    def get(self, job: Job | str) -> Job:
        """The job's current state."""
        return Job.model_validate_json(self._request("GET", f"/v1/videos/{job_id_of(job)}").content)

    def list_page(self, *, limit: int | None = None, cursor: str | None = None) -> JobList:
        """One page of this API key's jobs, newest first; pass `next_cursor` as `cursor` for the next."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        return JobList.model_validate_json(self._request("GET", "/v1/videos", params=params).content)

    def list(self, *, limit: int | None = None, page_size: int | None = None) -> Iterator[Job]:
        """Every job of this API key, newest first, fetching pages as it goes; at most `limit` jobs."""
        cursor: str | None = None
        seen = 0
        while True:
            page = self.list_page(limit=page_size, cursor=cursor)
            for job in page.data:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield job
            if not page.has_more or not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job: Job | str) -> Job:
        """Cancel: a queued job is `canceled` at once; a running one `canceling` until the worker stops it.
        A job that already ended raises ConflictError."""
        return Job.model_validate_json(self._request("POST", f"/v1/videos/{job_id_of(job)}/cancel").content)

    def delete(self, job: Job | str) -> None:
        """Delete the job: its record, every stored file and its idempotency entry (a running job is canceled
        first). A job that does not exist raises NotFoundError."""
        self._request("DELETE", f"/v1/videos/{job_id_of(job)}")

    # -- waiting ------------------------------------------------------------------------------------------

    def wait(
        self,
        job: Job | str,
        *,
        progress: bool = False,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        use_events: bool = True,
    ) -> Job:
        """Block until the job has ended and return it (check `job.status`: succeeded, failed or canceled).

        Follows the live event stream (`GET /v1/videos/{id}/events`), reconnecting with `Last-Event-ID` when
        the connection drops; falls back to polling every `poll_interval` seconds when the stream cannot be
        had. `progress=True` draws a tqdm bar: percent, stage, step/total, queue position, ETA.
        `timeout` (seconds) raises WaitTimeoutError."""
        job_id = job_id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(job_id) if progress else None
        state = _WaitState(job if isinstance(job, Job) else None, bar)
        try:
            if state.job is not None and state.job.terminal:
                return state.job
            if use_events:
                done = self._follow_events(job_id, state, deadline)
                if done is not None:
                    return done
            return self._poll(job_id, state, deadline, poll_interval)
        finally:
            if bar is not None:
                bar.close()

    def _follow_events(self, job_id: str, state: _WaitState, deadline: float | None) -> Job | None:
        """The ended job, or None: this server or the network in between cannot stream (poll instead)."""
        parser = SSEParser()
        failures = 0
        while True:
            state.check(deadline)
            headers = {**self._headers, "Accept": "text/event-stream", "Cache-Control": "no-store"}
            if parser.last_event_id:
                headers["Last-Event-ID"] = parser.last_event_id
            read = STREAM_READ_TIMEOUT if deadline is None else max(0.1, min(STREAM_READ_TIMEOUT,
                                                                               deadline - time.monotonic()))
            received = 0
            try:
                with self._http.stream("GET", self._url(f"/v1/videos/{job_id}/events"), headers=headers,
                                       timeout=httpx.Timeout(self._timeout, read=read)) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = error_of(response.status_code, response.headers, response.content)
                        if error.code == "job_not_found" or error.status_code == 401:
                            raise error
                        wait = self.retry.delay(failures + 1, error.retry_after) if self.retry.retryable(error) else None
                        if wait is None:
                            return None  # no event stream here (an older server, a proxy): poll
                        failures += 1
                        time.sleep(wait)
                        continue
                    if not is_event_stream(response.headers.get("content-type")):
                        return None
                    for event in parser.events(response.iter_lines()):
                        if event.event != "job":
                            continue
                        received += 1
                        failures = 0
                        if state.seen(Job.model_validate_json(event.data)):
                            return state.job
                        state.check(deadline)
            except httpx.TransportError:
                state.check(deadline)
                failures += 1
                if failures >= MAX_STREAM_FAILURES:
                    return None
                time.sleep(parser.retry_ms / 1000)
                continue
            if received == 0:
                # The stream ended with nothing new: it hit the server's time limit, or the job is gone (a GET
                # says which: it raises NotFoundError for a deleted job).
                if state.seen(self.get(job_id)):
                    return state.job
                time.sleep(parser.retry_ms / 1000)

    def _poll(self, job_id: str, state: _WaitState, deadline: float | None, interval: float) -> Job:
        while True:
            if state.seen(self.get(job_id)):
                assert state.job is not None
                return state.job
            state.check(deadline)
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    # -- files --------------------------------------------------------------------------------------------

    def download(self, job: Job | str, path: str | os.PathLike[str], *, variant: str = "video") -> Path:
        """Stream a succeeded job's `video` (MP4), `thumbnail` (JPEG) or `metadata` (JSON sidecar) to `path`
        (a folder: the server's file name inside it) and check its sha256 against the job record. The file
        appears only complete and verified; on a mismatch nothing is kept and ChecksumMismatchError is raised."""
        record = job if isinstance(job, Job) and job.outputs is not None else self.get(job)
        output = record.outputs.of(variant) if record.outputs is not None else None
        target = Path(path)
        url = f"/v1/videos/{record.id}/content"
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._http.stream("GET", self._url(url), params={"variant": variant}, headers=self._headers,
                                       follow_redirects=True) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = error_of(response.status_code, response.headers, response.content)
                        wait = self.retry.delay(attempt, error.retry_after) if self.retry.retryable(error) else None
                        if wait is None:
                            raise error
                        time.sleep(wait)
                        continue
                    if target.is_dir():
                        target = target / _filename(response.headers, record.id, variant)
                    return _save(response.iter_bytes(), target, output.sha256 if output else None)
            except httpx.TransportError as exc:
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise APIConnectionError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
                time.sleep(wait)


class _WaitState:
    """What `wait` knows of the job, shared by its streaming and polling halves (sync and async)."""

    def __init__(self, job: Job | None, bar: ProgressBar | None) -> None:
        self.job = job
        self.bar = bar

    def seen(self, job: Job) -> bool:
        """Take a newer state of the job; True once it has ended."""
        self.job = job
        if self.bar is not None:
            self.bar.update(job)
        return job.terminal

    def check(self, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            where = f" (last seen {self.job.status})" if self.job is not None else ""
            raise WaitTimeoutError(f"the job did not end in time{where}", self.job)


def _filename(headers: httpx.Headers, job_id: str, variant: str) -> str:
    disposition = headers.get("content-disposition", "")
    for part in disposition.split(";"):
        name, _, value = part.strip().partition("=")
        if name.lower() == "filename" and value.strip('"') and "/" not in value and "\\" not in value:
            return value.strip('"')
    return {"video": f"{job_id}.mp4", "thumbnail": f"{job_id}-thumbnail.jpg",
            "metadata": f"{job_id}-metadata.json"}[variant]


class _Download:
    """Write chunks to a temporary file beside `target`, hashing as they come; `finish` checks and renames."""

    def __init__(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        self.file = os.fdopen(fd, "wb")
        self.tmp = Path(name)
        self.target = target
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)

    def finish(self, expected_sha256: str | None) -> Path:
        self.file.close()
        actual = self.digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            self.tmp.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{self.target.name}: sha256 {actual} differs from the job record's {expected_sha256}; not kept"
            )
        os.replace(self.tmp, self.target)
        return self.target

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _save(chunks: Iterator[bytes], target: Path, expected_sha256: str | None) -> Path:
    download = _Download(target)
    try:
        for chunk in chunks:
            download.write(chunk)
    except BaseException:
        download.abort()
        raise
    return download.finish(expected_sha256)

