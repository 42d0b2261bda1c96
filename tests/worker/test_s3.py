"""The S3 backend end to end: the worker uploads through boto3 to an S3 server over HTTP (moto, loopback)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from service.jobs.schemas import JobStatus
from service.jobs.storage import S3Storage
from tests.support import moto_s3
from worker.video import SYNTHETIC_LABEL, probe_mp4


@pytest.fixture(scope="module")
def s3_endpoint():
    yield from moto_s3()


def _storage(endpoint: str, bucket: str) -> S3Storage:
    return S3Storage(
        bucket,
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        timeout_seconds=2.0,
    )


def test_job_uploads_to_s3(env, tiny_pipeline, make_runtime, s3_endpoint, tmp_path):
    storage = _storage(s3_endpoint, f"{env.prefix}-videos")
    storage.create_bucket()
    payload, record = env.run_one(make_runtime(tiny_pipeline, storage))
    assert record.status == JobStatus.succeeded, record.error
    out = record.outputs
    assert storage.size(out.video.key) == out.video.bytes
    head = storage.client.head_object(Bucket=storage.bucket, Key=out.video.key)
    assert head["ContentType"] == "video/mp4"

    # a presigned GET over HTTP returns the playable MP4
    url = storage.presigned_url(out.video.key, 60)
    path = tmp_path / "v.mp4"
    with urllib.request.urlopen(url, timeout=10) as response:
        path.write_bytes(response.read())
    info = probe_mp4(path)
    assert (info["frames"], info["height"], info["width"]) == (8, 32, 48)
    assert info["tags"]["comment"] == SYNTHETIC_LABEL
    assert json.loads(storage.read_bytes(out.sidecar.key))["job_id"] == payload.job_id
    assert storage.read_bytes(out.thumbnail.key)[:2] == b"\xff\xd8"


def test_missing_bucket_fails_storage_error(env, tiny_pipeline, make_runtime, s3_endpoint):
    storage = _storage(s3_endpoint, f"{env.prefix}-nobucket")
    _, record = env.run_one(make_runtime(tiny_pipeline, storage, upload_attempts=2))
    assert record.status == JobStatus.failed and record.error.code == "storage_error"
    assert "after 2 attempts" in record.error.message
