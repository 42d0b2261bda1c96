"""The asyncio client against the running service: the same methods, concurrently."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bora_client import AsyncClient, AuthenticationError, ConflictError, NotFoundError
from tests.client.stack import SHORT, Fault, FaultProxy, Stack


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run` on a thread of its own: the main thread may hold another loop (Playwright's sync API)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario).result()


def test_async_client_every_method(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.base, api_key=stack.key) as client:
            texts = [f"Endoscopy of the colon, async {i} {secrets.token_hex(3)}" for i in range(2)]
            jobs = await asyncio.gather(*(client.create(text, **SHORT, seed=i) for i, text in enumerate(texts)))
            assert {job.seed for job in jobs} == {0, 1}
            done = await asyncio.gather(*(client.wait(job, timeout=120) for job in jobs))
            assert [job.status for job in done] == ["succeeded", "succeeded"]
            assert (await client.get(jobs[0].id)).outputs == done[0].outputs

            listed = [job.id async for job in client.list(page_size=1, limit=5)]
            assert set(listed[:2]) == {job.id for job in jobs}

            path = await client.download(done[0], tmp_path / "a.mp4")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == done[0].outputs.video.sha256

            with pytest.raises(ConflictError):
                await client.cancel(done[0])
            await client.delete(done[1])
            with pytest.raises(NotFoundError):
                await client.get(done[1])

        async with AsyncClient(stack.base, api_key="bora_wrong") as bad:
            with pytest.raises(AuthenticationError):
                await bad.get(jobs[0])

    run(scenario())


def test_async_retry_and_cut_stream(stack: Stack, proxy: FaultProxy) -> None:
    async def scenario() -> None:
        async with AsyncClient(proxy.url, api_key=stack.key) as client:
            proxy.add(Fault("POST", "/v1/videos", status=503, retry_after="0", forward_first=True))
            text = f"Ultrasound of the liver, async retry {secrets.token_hex(3)}"
            job = await client.create(text, num_frames=8, height=64, width=64, num_inference_steps=30,
                                      sampler="ddim")
            proxy.add(Fault("GET", f"/v1/videos/{job.id}/events", cut_after_events=1))
            done = await client.wait(job, timeout=180)
            assert done.status == "succeeded"
            assert [j.id async for j in client.list(limit=20) if j.input.prompt == text] == [job.id]

    run(scenario())
    streams = [seen for seen in proxy.seen if seen.path.endswith("/events")]
    assert len(streams) >= 2 and "last-event-id" in streams[1].headers
