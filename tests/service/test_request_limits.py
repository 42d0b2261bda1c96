"""Limits every request meets before a route runs, on the real server (uvicorn + httptools): each is a JSON
error with its own status, never a plain-text answer or a 422 about something else."""

from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import bearer


@pytest.fixture
def api(live_server, api_key):
    with httpx.Client(base_url=live_server, headers=bearer(api_key), timeout=10) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


@pytest.mark.parametrize("media_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_json_is_415(api, media_type):
    response = api.post("/v1/videos", content=b'{"prompt": "p"}', headers={"Content-Type": media_type})
    assert _error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("media_type", ["application/json", "application/json; charset=utf-8",
                                        "application/merge-patch+json"])
def test_json_media_types_are_accepted(api, media_type):
    response = api.post("/v1/videos", content=b'{"prompt": "p"}', headers={"Content-Type": media_type})
    assert response.status_code == 202, response.text


def test_a_cancel_without_a_body_needs_no_media_type(api):
    job_id = api.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    assert api.post(f"/v1/videos/{job_id}/cancel").status_code == 200


def test_headers_over_16_kib_are_431(api):
    assert _error(api.get("/v1/videos", headers={"X-Padding": "a" * (1 << 20)}), 431)["code"] == (
        "request_headers_too_large")
    assert api.get("/v1/videos", headers={"X-Padding": "a" * 4096}).status_code == 200


def test_an_over_long_url_is_414_json(api):
    assert _error(api.get("/v1/videos/" + "x" * 20000), 414)["code"] == "uri_too_long"
    assert _error(api.get("/v1/videos", params={"cursor": "c" * 20000}), 414)["code"] == "uri_too_long"
