"""The asyncio client: the same methods as `Client`, awaited (`list` is an async iterator)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
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
from bora_client.client import MAX_STREAM_FAILURES, STREAM_READ_TIMEOUT, _Download, _filename, _WaitState
from bora_client.errors import APIConnectionError, NotFoundError
from bora_client.models import Job, JobList, create_body, job_id_of


class AsyncClient:
    """`Client` for asyncio. Arguments default to `BORA_BASE_URL` and `BORA_API_KEY` from the environment."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        max_retry_wait: float = 60.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._headers = default_headers(resolve_api_key(api_key))
        self._timeout = timeout

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    async def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(
                    method, self._url(path), json=json, params=params, headers={**self._headers, **(headers or {})}
                )
            except httpx.TransportError as exc:
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(wait)
                continue
            if response.status_code < 400:
                return response
            error = error_of(response.status_code, response.headers, response.content)
            if isinstance(error, NotFoundError) and method == "DELETE" and attempt > 1:
                return response
            wait = self.retry.delay(attempt, error.retry_after) if self.retry.retryable(error) else None
            if wait is None:
                raise error
            await asyncio.sleep(wait)

    async def create(
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
        """See `Client.create`."""
        params = dict(num_frames=num_frames, height=height, width=width, fps=fps,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                      seed=seed, model=model, metadata=metadata, webhook=webhook)
        key = idempotency_key or str(uuid.uuid4())
        response = await self._request("POST", "/v1/videos", json=create_body(prompt, params),
                                       headers={"Idempotency-Key": key})
        return Job.model_validate_json(response.content)

    async def get(self, job: Job | str) -> Job:
        return Job.model_validate_json((await self._request("GET", f"/v1/videos/{job_id_of(job)}")).content)

    async def list_page(self, *, limit: int | None = None, cursor: str | None = None) -> JobList:
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        return JobList.model_validate_json((await self._request("GET", "/v1/videos", params=params)).content)

    async def list(self, *, limit: int | None = None, page_size: int | None = None) -> AsyncIterator[Job]:
        """Every job of this API key, newest first (`async for job in client.list()`)."""
        cursor: str | None = None
        seen = 0
        while True:
            page = await self.list_page(limit=page_size, cursor=cursor)
            for job in page.data:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield job
            if not page.has_more or not page.next_cursor:
                return
            cursor = page.next_cursor

    async def cancel(self, job: Job | str) -> Job:
        return Job.model_validate_json((await self._request("POST", f"/v1/videos/{job_id_of(job)}/cancel")).content)

    async def delete(self, job: Job | str) -> None:
        await self._request("DELETE", f"/v1/videos/{job_id_of(job)}")

    async def wait(
        self,
        job: Job | str,
        *,
        progress: bool = False,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        use_events: bool = True,
    ) -> Job:
        """See `Client.wait`."""
        job_id = job_id_of(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(job_id) if progress else None
        state = _WaitState(job if isinstance(job, Job) else None, bar)
        try:
            if state.job is not None and state.job.terminal:
                return state.job
            if use_events:
                done = await self._follow_events(job_id, state, deadline)
                if done is not None:
                    return done
            while True:
                if state.seen(await self.get(job_id)):
                    assert state.job is not None
                    return state.job
                state.check(deadline)
                await asyncio.sleep(
                    poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic()))
                )
        finally:
            if bar is not None:
                bar.close()

    async def _follow_events(self, job_id: str, state: _WaitState, deadline: float | None) -> Job | None:
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
                async with self._http.stream("GET", self._url(f"/v1/videos/{job_id}/events"), headers=headers,
                                             timeout=httpx.Timeout(self._timeout, read=read)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        error = error_of(response.status_code, response.headers, response.content)
                        if error.code == "job_not_found" or error.status_code == 401:
                            raise error
                        wait = self.retry.delay(failures + 1, error.retry_after) if self.retry.retryable(error) else None
                        if wait is None:
                            return None
                        failures += 1
                        await asyncio.sleep(wait)
                        continue
                    if not is_event_stream(response.headers.get("content-type")):
                        return None
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None or event.event != "job":
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
                await asyncio.sleep(parser.retry_ms / 1000)
                continue
            if received == 0:  # the server's time limit, or the job is gone (the GET raises NotFoundError)
                if state.seen(await self.get(job_id)):
                    return state.job
                await asyncio.sleep(parser.retry_ms / 1000)

    async def download(self, job: Job | str, path: str | os.PathLike[str], *, variant: str = "video") -> Path:
        """See `Client.download`."""
        record = job if isinstance(job, Job) and job.outputs is not None else await self.get(job)
        output = record.outputs.of(variant) if record.outputs is not None else None
        target = Path(path)
        url = f"/v1/videos/{record.id}/content"
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._http.stream("GET", self._url(url), params={"variant": variant},
                                             headers=self._headers, follow_redirects=True) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        error = error_of(response.status_code, response.headers, response.content)
                        wait = self.retry.delay(attempt, error.retry_after) if self.retry.retryable(error) else None
                        if wait is None:
                            raise error
                        await asyncio.sleep(wait)
                        continue
                    if target.is_dir():
                        target = target / _filename(response.headers, record.id, variant)
                    download = _Download(target)
                    try:
                        async for chunk in response.aiter_bytes():
                            download.write(chunk)
                    except BaseException:
                        download.abort()
                        raise
                    return download.finish(output.sha256 if output else None)
            except httpx.TransportError as exc:
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise APIConnectionError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(wait)
