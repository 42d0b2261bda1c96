"""Headless Debian chromium driven by Playwright, against the running service of tests/client/conftest.py.

Playwright talks to /usr/bin/chromium (apt `chromium`); it never downloads a browser. Every request the page
makes goes through `Browser.route`: one to anything but this machine's loopback is aborted and recorded, and
each test asserts there was none.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
# Flags from docs/environment.md: no sandbox (root in CI), and none of chromium's own background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required"]
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Page:
    """One browser context and page, with every request it made and every one that would have left loopback."""

    page: Any
    requests: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # uncaught errors and Content-Security-Policy violations


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True,
                                  service_workers="block")
    watched = Page(context.new_page())

    def guard(route: Any) -> None:
        url = route.request.url
        watched.requests.append(url)
        host = urlsplit(url).hostname or ""
        if url.startswith(("blob:", "data:")) or host in LOOPBACK:
            route.continue_()
        else:
            watched.outside.append(url)
            route.abort()

    context.route("**/*", guard)
    watched.page.on("pageerror", lambda error: watched.problems.append(f"uncaught: {error}"))
    watched.page.on("console", lambda message: watched.problems.append(message.text)
                    if "Content Security Policy" in message.text else None)
    try:
        yield watched
        assert watched.problems == []
    finally:
        context.close()
