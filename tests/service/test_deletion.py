"""`DELETE /v1/videos/{id}` (service/deletion.py) with S3 storage over HTTP (moto's server) and real Redis:
every object, the record, the listings, the RQ entry and the Idempotency-Key entry go; queued and running jobs
are canceled first."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.api.app import create_app
from service.jobs import deletion, jobstore
from service.jobs.config import Settings
from service.jobs.errors import JobStopping
from service.jobs.schemas import FileOutput, ImageOutput, Outputs, Stage, Timings, VideoOutput, content_url
from service.jobs.storage import Storage, output_key
from tests.service.conftest import REDIS_URL, TENANT, bearer, key_for, queued_record

BODY = {"prompt": "endoscopy of the stomach", "num_frames": 16, "height": 64, "width": 64}


@pytest.fixture
def s3_settings(prefix: str, tmp_path: Path, s3_server: str) -> Settings:
    return Settings(redis_url=REDIS_URL, key_prefix=prefix, data_dir=tmp_path / "data", storage="s3",
                    s3_bucket="bora-del-" + secrets.token_hex(4), s3_endpoint_url=s3_server,
                    s3_access_key_id="k", s3_secret_access_key="s", rate_limit_burst=1000)


@pytest.fixture
def s3_client(s3_settings: Settings) -> Iterator[TestClient]:
    app = create_app(s3_settings)
    app.state.api.storage.create_bucket()
    with TestClient(app, raise_server_exceptions=False, headers=bearer(key_for(s3_settings, TENANT))) as c:
        yield c


def succeed_in(storage: Storage, r: Redis, prefix: str, job_id: str) -> None:
    """What the worker does: run, upload the three objects, mark succeeded."""
    token = jobstore.mark_running(r, job_id, "test-worker", prefix=prefix).token
    jobstore.update_progress(r, job_id, Stage.uploading, prefix=prefix, token=token)
    for name, data in (("video.mp4", b"mp4" * 100), ("thumbnail.jpg", b"jpg"), ("metadata.json", b"{}")):
        storage.put_bytes(output_key(job_id, name, 1), data, "application/octet-stream")
    outputs = Outputs(
        video=VideoOutput(url=content_url(job_id), key=output_key(job_id, "video.mp4", 1), bytes=300,
                          content_type="video/mp4", width=64, height=64, frames=16, fps=8, duration_s=2.0),
        thumbnail=ImageOutput(url=content_url(job_id, "thumbnail"), key=output_key(job_id, "thumbnail.jpg", 1),
                              bytes=3, content_type="image/jpeg", width=64, height=64),
        sidecar=FileOutput(url=content_url(job_id, "metadata"), key=output_key(job_id, "metadata.json", 1), bytes=2,
                           content_type="application/json"),
    )
    jobstore.mark_succeeded(r, job_id, outputs, Timings(total_s=1.0), prefix=prefix, token=token)


def test_delete_a_succeeded_job_from_s3(s3_client: TestClient, s3_settings: Settings, redis_conn: Redis) -> None:
    prefix, storage = s3_settings.key_prefix, s3_client.app.state.api.storage
    created = s3_client.post("/v1/videos", json=BODY, headers={"Idempotency-Key": "k-1"})
    job_id = created.json()["id"]
    succeed_in(storage, redis_conn, prefix, job_id)
    keys = [output_key(job_id, name, 1) for name in deletion.OUTPUT_NAMES]
    assert all(storage.exists(key) for key in keys)
    assert redis_conn.exists(f"{prefix}:idem:{TENANT}:k-1")

    response = s3_client.delete(f"/v1/videos/{job_id}")
    assert response.status_code == 204 and response.content == b""
    assert not any(storage.exists(key) for key in keys)
    assert not redis_conn.exists(f"{prefix}:job:{job_id}", f"{prefix}:idem:{TENANT}:k-1", f"rq:job:{job_id}")
    assert redis_conn.zscore(f"{prefix}:jobs", job_id) is None
    assert redis_conn.zscore(f"{prefix}:tenant:{TENANT}:jobs", job_id) is None
    for path in (f"/v1/videos/{job_id}", f"/v1/videos/{job_id}/content", f"/v1/videos/{job_id}/events"):
        assert s3_client.get(path).json()["error"]["code"] == "job_not_found"
    again = s3_client.delete(f"/v1/videos/{job_id}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "job_not_found"
    replay = s3_client.post("/v1/videos", json=BODY, headers={"Idempotency-Key": "k-1"})
    assert replay.status_code == 202 and replay.json()["id"] != job_id  # the key no longer names the job


def test_delete_a_queued_job_takes_it_off_the_queue(s3_client: TestClient, s3_settings: Settings,
                                                    redis_conn: Redis) -> None:
    keys = jobstore.Keys(s3_settings.key_prefix)
    job_id = s3_client.post("/v1/videos", json=BODY).json()["id"]
    assert redis_conn.lrange(keys.rq_queue, 0, -1) == [job_id.encode()]
    assert s3_client.delete(f"/v1/videos/{job_id}").status_code == 204
    assert redis_conn.llen(keys.rq_queue) == 0 and not redis_conn.exists(f"rq:job:{job_id}")


def test_another_tenants_job_is_not_deleted(s3_client: TestClient, s3_settings: Settings) -> None:
    job_id = s3_client.post("/v1/videos", json=BODY).json()["id"]
    other = bearer(key_for(s3_settings, "tenant-b"))
    assert s3_client.delete(f"/v1/videos/{job_id}", headers=other).status_code == 404
    assert s3_client.get(f"/v1/videos/{job_id}").status_code == 200


def test_a_running_job_is_stopped_before_it_is_deleted(s3_settings: Settings, redis_conn: Redis) -> None:
    prefix = s3_settings.key_prefix
    app = create_app(s3_settings)
    storage = app.state.api.storage
    storage.create_bucket()
    record = queued_record()
    jobstore.create(redis_conn, record, prefix=prefix)
    running = jobstore.mark_running(redis_conn, record.id, "test-worker", prefix=prefix)
    with pytest.raises(JobStopping) as caught:  # no worker stops it here
        deletion.delete_job(redis_conn, storage, running.record, prefix=prefix, stop_wait_seconds=0.3)
    assert caught.value.code == "job_stopping" and caught.value.retry_after_seconds == 2
    assert jobstore.get(redis_conn, record.id, prefix=prefix).status == "canceling"  # asked to stop, kept

    # what the worker does between steps
    jobstore.mark_canceled(redis_conn, record.id, prefix=prefix, token=running.token, actor="test-worker")
    current = jobstore.get(redis_conn, record.id, prefix=prefix)
    assert deletion.delete_job(redis_conn, storage, current, prefix=prefix).status == "canceled"
    assert jobstore.get(redis_conn, record.id, prefix=prefix) is None
