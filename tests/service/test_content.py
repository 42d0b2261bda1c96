"""`GET /v1/videos/{id}/content`: local streaming with Range, thumbnails, S3 redirects, not-ready answers."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.jobs import jobstore
from service.jobs.config import Settings
from tests.service.conftest import bearer, finish_like_worker

VIDEO = bytes(range(256)) * 40  # 10240 bytes, content checkable by offset
THUMB = b"\xff\xd8\xff\xe0 fake jpeg \xff\xd9"


def submit(client) -> str:
    return client.post("/v1/videos", json={"prompt": "p"}).json()["id"]


def test_not_ready_is_409_and_failed_is_409(client, redis_conn, settings):
    job_id = submit(client)
    response = client.get(f"/v1/videos/{job_id}/content")
    assert response.status_code == 409 and response.json()["error"]["code"] == "video_not_ready"
    token = jobstore.mark_running(redis_conn, job_id, "w", prefix=settings.key_prefix).token
    jobstore.mark_failed(redis_conn, job_id, "numerical_error", "NaN at step 3", prefix=settings.key_prefix,
                         token=token, actor=token)
    response = client.get(f"/v1/videos/{job_id}/content")
    assert response.status_code == 409 and response.json()["error"]["code"] == "video_unavailable"
    job = client.get(f"/v1/videos/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "numerical_error", "message": "NaN at step 3", "retryable": False}


def test_local_video_streams_with_range(client, redis_conn, settings):
    job_id = submit(client)
    finish_like_worker(redis_conn, settings, job_id, VIDEO, THUMB)
    job = client.get(f"/v1/videos/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"] == 100
    assert job["outputs"]["video"]["url"] == f"/v1/videos/{job_id}/content"
    assert job["outputs"]["video"]["bytes"] == len(VIDEO)

    full = client.get(f"/v1/videos/{job_id}/content")
    assert full.status_code == 200 and full.content == VIDEO
    assert full.headers["content-type"] == "video/mp4"
    assert full.headers["accept-ranges"] == "bytes"
    assert "inline" in full.headers["content-disposition"]

    part = client.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(VIDEO)}"
    assert part.content == VIDEO[100:200]
    tail = client.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == VIDEO[-16:]
    for past_the_end in [f"bytes={len(VIDEO) + 5}-", f"bytes={len(VIDEO)}-{len(VIDEO) + 9}", "bytes=-0"]:
        bad = client.get(f"/v1/videos/{job_id}/content", headers={"Range": past_the_end})
        assert bad.status_code == 416, past_the_end
        assert bad.json()["error"]["code"] == "range_not_satisfiable"
        assert bad.headers["content-range"] == f"bytes */{len(VIDEO)}"
    # RFC 9110 §14.2: a Range the server can't parse is ignored, the whole file is the answer
    for malformed in ["bytes=abc", "bytes=5-2", "items=0-1", "bytes=", "bytes=1-2-3", "0-10"]:
        whole = client.get(f"/v1/videos/{job_id}/content", headers={"Range": malformed})
        assert whole.status_code == 200 and whole.content == VIDEO, malformed

    head = client.head(f"/v1/videos/{job_id}/content")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(VIDEO)

    thumb = client.get(f"/v1/videos/{job_id}/content", params={"variant": "thumbnail"})
    assert thumb.status_code == 200 and thumb.content == THUMB
    assert thumb.headers["content-type"] == "image/jpeg"
    wrong = client.get(f"/v1/videos/{job_id}/content", params={"variant": "gif"})
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "query.variant"


def test_if_none_match_with_the_current_etag_is_304(client, redis_conn, settings):
    job_id = submit(client)
    finish_like_worker(redis_conn, settings, job_id, VIDEO, THUMB)
    full = client.get(f"/v1/videos/{job_id}/content")
    etag = full.headers["etag"]
    assert etag == '"' + client.get(f"/v1/videos/{job_id}").json()["outputs"]["video"]["sha256"] + '"'
    for matching in [etag, f'W/{etag}', f'"other", {etag}', "*"]:
        cached = client.get(f"/v1/videos/{job_id}/content", headers={"If-None-Match": matching})
        assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag, matching
    fresh = client.get(f"/v1/videos/{job_id}/content", headers={"If-None-Match": '"stale"'})
    assert fresh.status_code == 200 and fresh.content == VIDEO


def test_missing_thumbnail_and_missing_file_are_404(client, redis_conn, settings):
    job_id = submit(client)
    finish_like_worker(redis_conn, settings, job_id, VIDEO)
    response = client.get(f"/v1/videos/{job_id}/content", params={"variant": "thumbnail"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "content_not_found"
    (settings.storage_dir / "videos" / job_id / "1" / "video.mp4").unlink()
    response = client.get(f"/v1/videos/{job_id}/content")
    assert response.status_code == 404 and response.json()["error"]["code"] == "content_missing"


def test_public_base_url_makes_urls_absolute(redis_conn, settings, api_key):
    settings = settings.model_copy(update={"public_base_url": "https://bora.example/"})
    with TestClient(create_app(settings), headers=bearer(api_key)) as client:
        response = client.post("/v1/videos", json={"prompt": "p"})
        job_id = response.json()["id"]
        assert response.headers["location"] == f"https://bora.example/v1/videos/{job_id}"
        finish_like_worker(redis_conn, settings, job_id, VIDEO, THUMB)
        outputs = client.get(f"/v1/videos/{job_id}").json()["outputs"]
        assert outputs["video"]["url"] == f"https://bora.example/v1/videos/{job_id}/content"
        assert outputs["thumbnail"]["url"] == f"https://bora.example/v1/videos/{job_id}/content?variant=thumbnail"


@pytest.fixture
def s3_settings(settings: Settings, s3_server: str) -> Settings:
    return Settings(
        redis_url=settings.redis_url, key_prefix=settings.key_prefix, data_dir=settings.data_dir,
        storage="s3", s3_bucket="bora-videos", s3_endpoint_url=s3_server, s3_access_key_id="test",
        s3_secret_access_key="test", presign_ttl_seconds=120,
    )


def test_s3_content_redirects_to_a_fresh_presigned_url(redis_conn, s3_settings, s3_server, tmp_path, api_key):
    from service.jobs import storage as storage_mod

    store = storage_mod.make_storage(s3_settings)
    store.create_bucket()
    with TestClient(create_app(s3_settings), headers=bearer(api_key)) as client:
        job_id = submit(client)
        token = jobstore.mark_running(redis_conn, job_id, "w", prefix=s3_settings.key_prefix).token
        from service.jobs.schemas import Outputs, Timings, VideoOutput, content_url

        key = storage_mod.output_key(job_id, "video.mp4", 1)
        store.put_bytes(key, VIDEO, "video/mp4")
        outputs = Outputs(video=VideoOutput(
            url=content_url(job_id), key=key, bytes=len(VIDEO), content_type="video/mp4", width=64, height=64,
            frames=16, fps=8, duration_s=2.0,
        ))
        jobstore.mark_succeeded(redis_conn, job_id, outputs, Timings(total_s=1.0), prefix=s3_settings.key_prefix,
                                token=token)

        first = client.get(f"/v1/videos/{job_id}/content", follow_redirects=False)
        assert first.status_code == 307
        assert first.headers["cache-control"] == "no-store"
        url = first.headers["location"]
        assert url.startswith(f"{s3_server}/bora-videos/videos/{job_id}/1/video.mp4?")
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["120"]
        fetched = httpx.get(url)
        assert fetched.status_code == 200 and fetched.content == VIDEO
        import time

        time.sleep(1.1)  # X-Amz-Date has one-second resolution
        second = client.get(f"/v1/videos/{job_id}/content", follow_redirects=False)
        assert second.headers["location"] != url  # signed afresh on every call
