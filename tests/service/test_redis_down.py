"""With Redis unreachable every Redis-backed endpoint answers 503 JSON quickly; health stays 200."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.jobs.config import Settings
from tests.service.conftest import bearer, key_for
from tests.support import free_port


@pytest.fixture
def dead_client(tmp_path):
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="dead", data_dir=tmp_path)
    headers = bearer(key_for(settings, "t"))  # keys live in a file: auth works without Redis
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=headers) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/videos", {"prompt": "p"}),
        ("POST", "/generate", {"prompt": "p"}),
        ("GET", "/v1/videos", None),
        ("GET", "/v1/videos/vid_00000000000000000000000000000000", None),
        ("GET", "/v1/videos/vid_00000000000000000000000000000000/content", None),
        ("POST", "/v1/videos/vid_00000000000000000000000000000000/cancel", None),
        ("GET", "/readyz", None),
    ],
)
def test_503_json_fast(dead_client, method, path, body):
    start = time.perf_counter()
    response = dead_client.request(method, path, json=body)
    assert time.perf_counter() - start < 3.0
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "unavailable_error"
    assert error["code"] in ("redis_unavailable", "not_ready")
    assert "Traceback" not in response.text


def test_health_and_metrics_still_answer(dead_client):
    assert dead_client.get("/healthz").status_code == 200
    response = dead_client.get("/metrics")
    assert response.status_code == 200 and "bora_redis_up 0.0" in response.text


def test_validation_still_comes_first(dead_client):
    assert dead_client.post("/v1/videos", json={"prompt": ""}).status_code == 422


def test_unexpected_errors_are_500_json_without_traceback(tmp_path, monkeypatch):
    from service.jobs import jobstore

    async def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(jobstore, "get_async", boom)  # what GET /v1/videos/{id} awaits
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="x", data_dir=tmp_path)
    headers = bearer(key_for(settings, "t"))
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=headers) as client:
        response = client.get("/v1/videos/vid_00000000000000000000000000000000")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text and "Traceback" not in response.text
