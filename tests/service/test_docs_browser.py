"""`/docs` in headless chromium on a host with no internet: Swagger UI renders the API's operations from
assets this server serves, and the page makes no request beyond loopback (every other one is aborted and
recorded by the `page` fixture, so a CDN reference would leave the page blank and fail here)."""

from __future__ import annotations

import time

import pytest

from tests.client.playground.conftest import Page, browser, page  # noqa: F401 - the fixtures, shared

pytestmark = pytest.mark.slow


def test_swagger_ui_renders_offline(live_server: str, page: Page) -> None:  # noqa: F811 - the fixture
    page.page.goto(f"{live_server}/docs")
    deadline = time.monotonic() + 30
    while page.page.locator(".opblock").count() == 0:  # one block per operation, drawn from /openapi.json
        assert time.monotonic() < deadline, "Swagger UI drew no operation"
        time.sleep(0.1)
    summaries = page.page.locator(".opblock-summary-path").all_inner_texts()
    assert "/v1/videos" in summaries and "/v1/videos/{job_id}" in summaries, summaries
    assert page.page.locator(".swagger-ui .info .title").inner_text().startswith("Bora video API")
    assert page.outside == [], page.outside
    assert any(url.endswith("/openapi.json") for url in page.requests), page.requests
