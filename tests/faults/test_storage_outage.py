"""The S3 server stops during jobs: their uploads are retried with backoff, then they fail `storage_error`
with no object left behind; once the server is back, new jobs succeed. S3 is moto over HTTP on a spare
loopback port, in this process (its bucket survives a stop/start, like a real object store).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from rq import Queue, SimpleWorker

from service.jobs import jobstore, queueing, reaper
from service.jobs.config import Settings
from service.jobs.connection import connect
from service.jobs.schemas import JobRecord, JobStatus, Stage, VideoInput, utcnow
from service.jobs.storage import make_storage
from tests.faults.conftest import JOB, dump, error_of
from tests.support import free_port, wait_for

MEDIUM = {"num_frames": 16, "height": 64, "width": 64, "num_inference_steps": 40}


class S3Server:
    """moto in this process behind a TCP proxy on a spare port. `stop()` takes the endpoint down the way a
    dead server does — refusing new connections and cutting open ones (moto's own server keeps serving
    open keep-alive connections after its stop) — while the bucket's contents survive for `start()`."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.backend_port, self.port = free_port(), free_port()
        self.bucket = f"bora-faults-{self.port}"  # moto's state is per process: a bucket per test
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = ThreadedMotoServer(ip_address="127.0.0.1", port=self.backend_port, verbose=False)
        self.backend.start()
        self.listener: socket.socket | None = None
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self.backend_port))
            with self.lock:
                self.sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not, on Linux)
            self.listener.close()
            self.listener = None
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self.sockets.clear()

    def close(self) -> None:
        self.stop()
        self.backend.stop()

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{self.backend_port}", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip

    def keys(self) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture
def s3() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    server.client().create_bucket(Bucket=server.bucket)
    try:
        yield server
    finally:
        server.close()


S3_ENV = dict(
    BORA_STORAGE="s3", BORA_S3_REGION="us-east-1", BORA_S3_ACCESS_KEY_ID="testing",
    BORA_S3_SECRET_ACCESS_KEY="testing",
)  # fmt: skip


def check_bucket(s3: S3Server, jobs: dict[str, dict[str, Any]]) -> None:
    """Succeeded jobs have their three objects, whole; nothing else is in the bucket."""
    expected = {}
    for job in jobs.values():
        if job["status"] == "succeeded":
            for output in job["outputs"].values():
                if output:
                    expected[output["key"]] = output["bytes"]
    listed = {
        obj["Key"]: obj["Size"] for obj in s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    }
    assert listed == expected


def test_s3_outage_fails_uploads_then_recovers(make_stack, s3, report):
    stack = make_stack(BORA_S3_ENDPOINT_URL=s3.url, BORA_S3_BUCKET=s3.bucket, **S3_ENV)
    stack.start_api()
    worker = stack.start_worker("w1")
    stack.wait_ready(worker)
    with httpx.Client(base_url=stack.base, timeout=5) as client:
        before = stack.submit(client, 1, **JOB)
        during = stack.submit(client, 3, **MEDIUM)
        wait_for(lambda: stack.record(during[0]).get("stage") == "denoising", 60, "a job mid-way", 0.02)
        s3.stop()
        stopped = time.monotonic()

        jobs = wait_for(lambda: stack.ended(client, during), 90, "the jobs to fail", 0.2)
        failed_after = time.monotonic() - stopped
        assert all(j["status"] == "failed" and error_of(j) == "storage_error" for j in jobs.values()), dump(
            jobs
        )
        assert all(j["error"]["retryable"] for j in jobs.values())
        retrying = max((j.get("timings") or {}).get("upload_s") or 0.0 for j in jobs.values())
        # A failed job has no content: 409 JSON, not a 5xx.
        assert client.get(f"/v1/videos/{during[0]}/content").status_code == 409

        s3.start()
        after = stack.submit(client, 2, **JOB)
        jobs = wait_for(
            lambda: stack.ended(client, before + during + after), 60, "the jobs after the outage", 0.2
        )
        assert [jobs[i]["status"] for i in before + after] == ["succeeded"] * 3, dump(jobs)
        wait_for(lambda: check_bucket(s3, jobs) is None, 10, "the bucket")  # raises on a stray object
    assert worker.poll() is None
    report(
        f"S3 outage: {len(during)} jobs failed storage_error after retrying uploads for up to {retrying:.2f} s "
        f"(2 attempts x botocore's 3, backoff 0.2 s); the last {failed_after:.1f} s after the stop; "
        f"{len(before + after)} jobs before/after it succeeded; no stray object"
    )


class StopsAfterFirstPut:
    """A storage whose server goes away right after the first object is stored (the video)."""

    def __init__(self, storage: Any, s3: S3Server) -> None:
        self.storage, self.s3, self.puts = storage, s3, 0

    def put_file(self, key: str, path: Any, content_type: str) -> None:
        self.puts += 1
        if self.puts == 2:
            self.s3.stop()
        self.storage.put_file(key, path, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def test_objects_of_a_failed_job_are_deleted_even_if_storage_was_down(
    redis_server, s3, tiny_model_dir: Path, tmp_path: Path
):
    """The video is stored, then S3 goes away: the job fails, its video cannot be deleted at once, so the
    reaper deletes it once S3 is back. In-process worker against our own Redis."""
    from model.pipeline import BoraPipeline
    from worker import jobs
    from worker.metrics import WorkerMetrics

    settings = Settings(
        redis_url=redis_server.url, data_dir=tmp_path, storage="s3", s3_bucket=s3.bucket, s3_endpoint_url=s3.url,
        s3_access_key_id="testing", s3_secret_access_key="testing", upload_attempts=2,
        upload_backoff_seconds=0.05,
    )  # fmt: skip
    r = connect(settings)
    storage = make_storage(settings)
    rt = jobs.Runtime(
        pipeline=BoraPipeline.from_pretrained(tiny_model_dir, device="cpu"),
        redis=r,
        settings=settings,
        storage=StopsAfterFirstPut(storage, s3),  # type: ignore[arg-type]
        metrics=WorkerMetrics(),
        worker_id="in-process",
        upload_attempts=settings.upload_attempts,
        upload_backoff_s=settings.upload_backoff_seconds,
    )
    inp = VideoInput(
        prompt="a cell dividing", num_frames=4, height=32, width=32, fps=8, num_inference_steps=2,
        guidance_scale=7.0, sampler="ddim", seed=1,
    )  # fmt: skip
    now = utcnow()
    record = JobRecord(
        id=jobstore.new_job_id(), status=JobStatus.queued, stage=Stage.queued, created_at=now, updated_at=now,
        model="tiny", input=inp, seed=1,
    )  # fmt: skip
    jobstore.create(r, record, prefix=settings.key_prefix)
    queueing.enqueue(r, settings, queueing.payload_of(record))
    jobs.install(rt)
    try:
        SimpleWorker([Queue(settings.queue_name, connection=r)], connection=r).work(burst=True)
    finally:
        jobs.install(None)

    failed = jobstore.get(r, record.id, prefix=settings.key_prefix)
    assert failed is not None and failed.status == JobStatus.failed and failed.error is not None
    assert failed.error.code == "storage_error"
    run_keys = {f"videos/{record.id}/1/{name}" for name in ("video.mp4", "thumbnail.jpg", "metadata.json")}
    orphans = jobstore.Keys(settings.key_prefix).orphans
    # Each object of the run was noted before its upload; the failed run could delete none of them.
    assert r.hgetall(orphans) == {key.encode(): record.id.encode() for key in run_keys}

    s3.start()
    video_key = f"videos/{record.id}/1/video.mp4"
    assert s3.keys() == [video_key]  # stored whole before the outage; the job failed, so it must go
    assert set(reaper.purge_orphans(r, settings, storage)) == run_keys
    assert s3.keys() == []
    assert r.hlen(orphans) == 0
