"""The sync client against the running service (uvicorn + worker + Redis, tiny model), auth on with a real key:
every method, typed errors, retries that never make a second job, `wait` across a cut event stream and its
polling fallback, checksum-verified downloads, and DELETE removing every trace of a job."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis

from bora_client import (
    AuthenticationError,
    ChecksumMismatchError,
    Client,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    WaitTimeoutError,
)
from bora_client.models import Job
from tests.client.stack import REDIS_URL, SHORT, Fault, FaultProxy, Stack
from tests.support import free_port, start_process, stop_processes, wait_for, wait_http

# ~100 steps on 16 × 128 × 128: runs long enough to be caught running on a loaded CPU.
LONG = {"num_frames": 16, "height": 128, "width": 128, "num_inference_steps": 100, "sampler": "ddim"}
MEDIUM = {"num_frames": 8, "height": 64, "width": 64, "num_inference_steps": 30, "sampler": "ddim"}


def prompt(label: str) -> str:
    return f"An echocardiogram of a beating heart ({label} {secrets.token_hex(3)})"


@pytest.fixture
def client(stack: Stack) -> Client:
    with Client(stack.base, api_key=stack.key, max_retry_wait=5) as c:
        yield c


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_wait_download(client: Client, stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = client.create(prompt("roundtrip"), **SHORT, seed=7, metadata={"study": "s-1"})
    assert job.status == "queued" and job.seed == 7 and job.metadata == {"study": "s-1"}
    assert job.input.num_inference_steps == 2 and job.input.height == 32

    done = client.wait(job, progress=True, timeout=120)
    assert done.status == "succeeded" and done.progress == 100 and done.outputs is not None
    bar = capsys.readouterr().err
    assert "100%" in bar and "succeeded" in bar and job.id[:12] in bar

    video = client.download(done, tmp_path / "heart.mp4")
    assert video == tmp_path / "heart.mp4" and video.read_bytes()[4:8] == b"ftyp"
    assert sha256(video) == done.outputs.video.sha256 and video.stat().st_size == done.outputs.video.bytes
    poster = client.download(done.id, tmp_path, variant="thumbnail")  # an id and a folder: the server's name
    assert poster.name == f"{job.id}-thumbnail.jpg" and poster.read_bytes()[:2] == b"\xff\xd8"
    sidecar = json.loads(client.download(done, tmp_path, variant="metadata").read_text())
    assert sidecar["seed"] == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []

    again = client.get(job.id)
    assert again.status == "succeeded" and again.outputs == done.outputs


def test_list_iterates_pages(client: Client) -> None:
    created = [client.create(prompt(f"list {i}"), **SHORT) for i in range(3)]
    page = client.list_page(limit=1)
    assert len(page.data) == 1 and page.has_more and page.next_cursor
    listed = [job.id for job in client.list(page_size=1)]  # one request per job: pages are followed
    assert listed[:3] == [job.id for job in reversed(created)]  # newest first
    assert len(listed) == len(set(listed))
    assert [job.id for job in client.list(limit=2)] == listed[:2]
    for job in created:
        client.wait(job, timeout=120)


def test_errors_are_typed(client: Client, stack: Stack) -> None:
    with Client(stack.base, api_key="bora_not-a-key") as bad:
        with pytest.raises(AuthenticationError) as caught:
            bad.list_page()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"

    with pytest.raises(NotFoundError) as missing:
        client.get("vid_" + "0" * 32)
    assert missing.value.code == "job_not_found" and missing.value.request_id

    with pytest.raises(InvalidRequestError) as invalid:
        client.create(prompt("invalid"), height=40)
    assert invalid.value.status_code == 422 and invalid.value.param == "body.height"

    job = client.wait(client.create(prompt("finished"), **SHORT), timeout=120)
    with pytest.raises(ConflictError) as conflict:
        client.cancel(job)
    assert conflict.value.code == "invalid_state"
    with Client(stack.base, api_key=stack.other_key) as other:  # another tenant's job does not exist for it
        with pytest.raises(NotFoundError):
            other.get(job)
        with pytest.raises(NotFoundError):
            other.delete(job)
    assert client.get(job).status == "succeeded"


def test_create_retries_a_429_and_a_lost_answer_with_one_job(stack: Stack, proxy: FaultProxy) -> None:
    proxy.add(Fault("POST", "/v1/videos", status=429, retry_after="1"))  # the service never sees this one
    proxy.add(Fault("POST", "/v1/videos", status=503, retry_after="0", forward_first=True))  # job made, answer lost
    text = prompt("retried")
    with Client(proxy.url, api_key=stack.key) as client:
        started = time.monotonic()
        job = client.create(text, **SHORT)
        elapsed = time.monotonic() - started
        posts = [seen for seen in proxy.seen if seen.method == "POST"]
        assert [seen.answered for seen in posts] == [429, 503, 202]
        keys = {seen.headers["idempotency-key"] for seen in posts}
        assert len(keys) == 1  # every retry carried the same key
        assert elapsed >= 1.0  # Retry-After: 1 was honoured
        same = [j for j in client.list() if j.input.prompt == text]
        assert [j.id for j in same] == [job.id]  # the lost answer's job is the one returned: one job
        client.wait(job, timeout=120)


def test_create_retries_the_services_own_rate_limit(stack: Stack, tmp_path: Path) -> None:
    """A second API on the same stack with a real rate limit of 1 submission per 2 s (burst 1)."""
    port = free_port()
    env = {**stack.env, "BORA_PORT": str(port), "BORA_RATE_LIMIT_PER_SECOND": "0.5", "BORA_RATE_LIMIT_BURST": "1"}
    api = start_process([sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port",
                         str(port), "--log-level", "warning"], env, tmp_path / "api-limited.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", api, 60, "the rate-limited API", log=tmp_path / "api-limited.log")
        with Client(f"http://127.0.0.1:{port}", api_key=stack.key) as client:
            texts = [prompt("limited a"), prompt("limited b")]
            first = client.create(texts[0], **SHORT)
            started = time.monotonic()
            second = client.create(texts[1], **SHORT)  # 429 Retry-After, waited out, then accepted
            assert time.monotonic() - started >= 1.0
            with Client(f"http://127.0.0.1:{port}", api_key=stack.key, max_retries=0) as impatient:
                with pytest.raises(RateLimitError) as limited:
                    impatient.create(prompt("limited c"), **SHORT)
            assert limited.value.code == "rate_limited" and limited.value.retry_after is not None
            mine = sorted(j.id for j in client.list(limit=20) if j.input.prompt in texts)
            assert mine == sorted([first.id, second.id])
            for job in (first, second):
                client.wait(job, timeout=120)
    finally:
        stop_processes([api])


def test_wait_reconnects_after_a_cut_event_stream(stack: Stack, proxy: FaultProxy) -> None:
    with Client(proxy.url, api_key=stack.key) as client:
        job = client.create(prompt("cut stream"), **MEDIUM)
        proxy.add(Fault("GET", f"/v1/videos/{job.id}/events", cut_after_events=1))
        done = client.wait(job, timeout=180)
    assert done.status == "succeeded"
    streams = [seen for seen in proxy.seen if seen.path.endswith("/events")]
    assert streams[0].faulted and "last-event-id" not in streams[0].headers
    assert len(streams) >= 2 and int(streams[1].headers["last-event-id"]) >= 0
    assert not [seen for seen in proxy.seen if seen.path == f"/v1/videos/{job.id}"]  # no polling was needed


def test_wait_polls_when_there_is_no_event_stream(stack: Stack, proxy: FaultProxy) -> None:
    with Client(proxy.url, api_key=stack.key) as client:
        job = client.create(prompt("no stream"), **SHORT)
        proxy.add(Fault("GET", f"/v1/videos/{job.id}/events", status=404))
        done = client.wait(job, timeout=120, poll_interval=0.2)
    assert done.status == "succeeded"
    assert [seen.path for seen in proxy.seen].count(f"/v1/videos/{job.id}") >= 1


def test_download_refuses_a_file_that_differs_from_the_record(client: Client, stack: Stack, tmp_path: Path) -> None:
    job = client.wait(client.create(prompt("tampered"), **SHORT), timeout=120)
    stored = stack.objects(job.id) / "1" / "video.mp4"  # the first run's outputs
    stored.write_bytes(stored.read_bytes() + b"tampered")
    with pytest.raises(ChecksumMismatchError):
        client.download(job, tmp_path / "video.mp4")
    assert list(tmp_path.iterdir()) == []  # nothing kept, not even the partial file


def test_wait_timeout(client: Client) -> None:
    job = client.create(prompt("timeout"), **LONG)
    with pytest.raises(WaitTimeoutError) as caught:
        client.wait(job, timeout=0.3)
    assert isinstance(caught.value.job, Job) and not caught.value.job.terminal
    client.cancel(job)
    assert client.wait(job, timeout=120).status == "canceled"


def test_cancel_a_running_job(client: Client) -> None:
    job = client.create(prompt("cancel"), **LONG)
    wait_for(lambda: client.get(job).status == "running", 120, "the job to start")
    assert client.cancel(job).status in ("canceling", "canceled")
    done = client.wait(job, timeout=120)
    assert done.status == "canceled" and done.error is not None and done.error.code == "canceled"


def test_delete_removes_every_trace(client: Client, stack: Stack) -> None:
    redis = Redis.from_url(REDIS_URL)
    key = "delete-" + secrets.token_hex(4)
    job = client.wait(client.create(prompt("delete"), **SHORT, idempotency_key=key), timeout=120)
    folder = stack.objects(job.id)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["metadata.json", "thumbnail.jpg", "video.mp4"]
    assert redis.exists(f"{stack.prefix}:idem:clinic:{key}")

    client.delete(job)
    assert not any(p.is_file() for p in folder.rglob("*"))
    assert not redis.exists(f"{stack.prefix}:job:{job.id}", f"{stack.prefix}:idem:clinic:{key}", f"rq:job:{job.id}")
    assert redis.zscore(f"{stack.prefix}:tenant:clinic:jobs", job.id) is None
    with pytest.raises(NotFoundError):
        client.get(job)
    with pytest.raises(NotFoundError):
        client.delete(job)
    assert job.id not in [j.id for j in client.list(limit=50)]
    lines = wait_for(lambda: [line for line in stack.audit_lines()
                              if line.get("event") == "job.deleted" and line.get("job_id") == job.id], 10, "audit")
    assert lines[0]["tenant"] == "clinic" and lines[0]["previous_status"] == "succeeded"
    assert job.input.prompt not in json.dumps(lines[0])  # the audit line keeps the prompt's hash only
    # The key is free again: the same key now makes a new job instead of naming the deleted one.
    assert client.create(prompt("after delete"), **SHORT, idempotency_key=key).id != job.id


def test_delete_cancels_a_running_job_first(client: Client, stack: Stack) -> None:
    job = client.create(prompt("delete running"), **LONG)
    wait_for(lambda: client.get(job).status == "running", 120, "the job to start")
    client.delete(job)
    with pytest.raises(NotFoundError):
        client.get(job)
    folder = stack.objects(job.id)
    assert not any(p.is_file() for p in folder.rglob("*"))
    line = wait_for(lambda: [x for x in stack.audit_lines()
                             if x.get("event") == "job.deleted" and x.get("job_id") == job.id], 10, "audit")[0]
    assert line["previous_status"] == "running" and line["outcome"] == "deleted"


def test_delete_answers_204_and_is_documented(stack: Stack) -> None:
    spec = httpx.get(f"{stack.base}/openapi.json").json()
    operation = spec["paths"]["/v1/videos/{job_id}"]["delete"]
    assert set(operation["responses"]) >= {"204", "401", "404", "409", "503"}


def test_client_imports_without_torch_or_fastapi() -> None:
    code = ("import sys, bora_client, bora_client.cli; "
            "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'service', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
