"""The playground at `/` in headless chromium against the running service: load, submit a preset prompt, watch
live progress, play and download the video, the 401/422 messages; with auth on and off. No request leaves
loopback. Screenshots go to $BORA_SCREENSHOT_DIR when set (docs/ holds the ones the README shows)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx

from tests.client.playground.conftest import Page
from tests.client.stack import Fault, FaultProxy, Stack

# A job long enough to be watched: the tiny model's trained shape, 40 denoising steps (seconds on a CPU).
WATCHED = {"num_frames": "16", "height": "64", "width": "64", "num_inference_steps": "40", "sampler": "ddim"}
QUICK = {"num_frames": "8", "height": "32", "width": "48", "num_inference_steps": "2", "sampler": "ddim"}
# Test-side recorder (not part of the page): every text the status fields show, in order.
RECORD_STATUS = """
window.__seen = [];
new MutationObserver(() => {
  const text = (id) => document.getElementById(id).textContent;
  window.__seen.push({status: text('status'), stage: text('stage'), step: text('step'),
                      queue: text('queue-position'), eta: text('eta'),
                      progress: document.getElementById('progress').value});
}).observe(document.getElementById('job-panel'), {subtree: true, childList: true, characterData: true});
"""


def wait_js(page: Page, expression: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function compiles its
    predicate with eval, which the page's Content-Security-Policy rightly refuses; evaluate is not eval.)"""
    deadline = time.monotonic() + timeout
    while not page.page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {expression}"
        time.sleep(0.05)


def screenshot(page: Page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("BORA_SCREENSHOT_DIR") or tmp_path)
    path = folder / name
    page.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def open_playground(page: Page, base: str) -> None:
    page.page.goto(base + "/")
    page.page.wait_for_selector("body[data-ready=true]", timeout=30_000)


def fill_params(page: Page, params: dict[str, str]) -> None:
    for name, value in params.items():
        if name == "sampler":
            page.page.select_option("#sampler", value)
        else:
            page.page.fill(f"#{name}", value)


def test_generate_watch_play_download(stack: Stack, page: Page, tmp_path: Path) -> None:
    p = page.page
    open_playground(page, stack.base)
    assert p.inner_text("#synthetic-label") == "synthetic — AI-generated"
    assert "requires a key" in p.inner_text("#auth-mode")
    # The served model's bounds (tiny: sides 32..256 in steps of 16, up to 32 frames), not the API's widest.
    assert p.get_attribute("#height", "max") == "256" and p.get_attribute("#height", "step") == "16"
    assert p.get_attribute("#num_frames", "max") == "32"

    p.fill("#api-key", stack.key)
    assert p.evaluate("sessionStorage.getItem('bora.apiKey')") == stack.key
    p.select_option("#preset", index=4)  # an ultrasound prompt from Bora's evaluation set
    prompt = p.input_value("#prompt")
    assert prompt.startswith(("An echocardiogram", "The video shows an echocardiogram"))
    fill_params(page, {**WATCHED, "seed": "11"})
    p.evaluate(RECORD_STATUS)
    p.click("#submit")
    wait_js(page, "document.getElementById('step').textContent.includes('/ 40')", 120)
    screenshot(page, "playground-running.png", tmp_path)  # mid-denoising, if the CPU is not too fast

    wait_js(page, "document.getElementById('job-panel').dataset.status === 'succeeded'", 180)
    job_id = p.inner_text("#job-id")
    seen = p.evaluate("window.__seen")
    steps = [s["step"] for s in seen if "/ 40" in s["step"]]
    progress = [s["progress"] for s in seen]
    assert len(set(steps)) >= 2, seen  # live progress advanced step by step
    assert progress == sorted(progress) and progress[-1] == 100 and any(0 < v < 100 for v in progress)
    assert {"running", "succeeded"} <= {s["status"] for s in seen}
    assert any(s["stage"] == "denoising" for s in seen)

    wait_js(page, "document.getElementById('video').readyState >= 2", 30)
    assert p.get_attribute("#video", "poster").startswith("blob:")
    assert p.inner_text("#seed-used") == "11"
    assert '"prompt"' in p.text_content("#metadata") and "synthetic" in p.text_content("#metadata")
    assert "sha256 verified" in p.inner_text("#download")
    p.wait_for_selector(f"#recent tr[data-id='{job_id}']")
    screenshot(page, "playground.png", tmp_path)

    with p.expect_download() as download_info:
        p.click("#download")
    download = download_info.value
    assert download.suggested_filename == f"{job_id}.mp4"
    job = httpx.get(f"{stack.base}/v1/videos/{job_id}", headers={"Authorization": f"Bearer {stack.key}"}).json()
    assert hashlib.sha256(Path(download.path()).read_bytes()).hexdigest() == job["outputs"]["video"]["sha256"]
    assert job["seed"] == 11 and job["input"]["prompt"] == prompt

    assert stack.key not in p.url and not any(stack.key in url for url in page.requests)
    assert page.outside == [] and len(page.requests) > 5


def test_bad_key_and_invalid_input_messages(stack: Stack, page: Page, tmp_path: Path) -> None:
    p = page.page
    open_playground(page, stack.base)
    p.fill("#prompt", "A colonoscopy")
    p.click("#submit")
    p.wait_for_selector("#message:not([hidden])")
    assert "needs an API key" in p.inner_text("#message")

    p.fill("#api-key", "bora_this-key-does-not-exist")
    p.click("#submit")
    wait_js(page, "document.getElementById('message').textContent.includes('refused')")
    assert p.get_attribute("#message", "data-status") == "401"
    assert "API key was refused" in p.inner_text("#message") and "Check the API key field" in p.inner_text("#message")
    screenshot(page, "playground-401.png", tmp_path)

    p.fill("#api-key", stack.key)
    p.fill("#prompt", "   ")  # passes the form's `required`, not the API
    p.click("#submit")
    wait_js(page, "document.getElementById('message').dataset.status === '422'")
    assert p.inner_text("#message").startswith("Invalid prompt:")
    assert page.outside == []


def test_works_with_auth_off(stack: Stack, page: Page) -> None:
    p = page.page
    open_playground(page, stack.open_base)
    assert "no key needed" in p.inner_text("#auth-mode")
    p.fill("#prompt", "Cell microscopy: bacteria drifting across the field")
    fill_params(page, QUICK)
    p.click("#submit")
    wait_js(page, "document.getElementById('job-panel').dataset.status === 'succeeded'", 180)
    wait_js(page, "document.getElementById('video').readyState >= 2", 30)
    job_id = p.inner_text("#job-id")
    p.wait_for_selector(f"#recent tr[data-id='{job_id}']")
    assert p.is_disabled("#cancel")
    assert p.is_hidden("#message") or p.get_attribute("#message", "data-status") == "info"  # a warning at most

    httpx.delete(f"{stack.open_base}/v1/videos/{job_id}").raise_for_status()  # gone behind the page's back
    p.click(f"#recent tr[data-id='{job_id}']")
    wait_js(page, "document.getElementById('message').dataset.status === '404'")
    assert "does not exist for this API key" in p.inner_text("#message")
    assert page.outside == []


def test_busy_and_unavailable_messages(stack: Stack, page: Page) -> None:
    """429 and 503 as a proxy in front of the service answers them (the page is served through it too)."""
    proxy = FaultProxy(stack.open_base)
    try:
        p = page.page
        open_playground(page, proxy.url)
        proxy.add(Fault("POST", "/v1/videos", status=429, retry_after="3"))
        p.fill("#prompt", "Endoscopy of the stomach")
        p.click("#submit")
        wait_js(page, "document.getElementById('message').dataset.status === '429'")
        assert "Too many submissions" in p.inner_text("#message") and "Try again in 3 s" in p.inner_text("#message")
        proxy.add(Fault("GET", "/v1/videos?limit", status=503, retry_after="2"))
        p.click("#refresh")
        wait_js(page, "document.getElementById('message').dataset.status === '503'")
        assert "temporarily unavailable" in p.inner_text("#message") and "2 s" in p.inner_text("#message")
        assert not [seen for seen in proxy.seen if seen.method == "POST" and not seen.faulted]  # nothing submitted
        assert page.outside == []
    finally:
        proxy.close()


def test_served_files_and_bounds(stack: Stack) -> None:
    page = httpx.get(f"{stack.base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN or any absolute URL in the page
    script = httpx.get(f"{stack.base}/playground/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "localStorage" not in script.text  # the key is kept per tab only
    model = httpx.get(f"{stack.base}/playground/model.json").json()
    assert model["name"] == "tiny" and model["max_frames"] == 32 and model["auth_required"] is True
    assert model["defaults"]["num_inference_steps"] == 10
    presets = httpx.get(f"{stack.base}/playground/presets.json").json()
    assert [d["domain"] for d in presets["domains"]] == ["endo", "uls", "mri", "cell"]
    for name in ("nope.js", "..%2Fmain.py", ".hidden.css", "index"):
        missing = httpx.get(f"{stack.base}/playground/{name}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "route_not_found"


def test_cancel_from_the_page(stack: Stack, page: Page) -> None:
    p = page.page
    open_playground(page, stack.open_base)
    p.fill("#prompt", "Real-time MRI of the beating heart")
    fill_params(page, {"num_frames": "16", "height": "128", "width": "128", "num_inference_steps": "100",
                       "sampler": "ddim"})
    p.click("#submit")
    wait_js(page, "['queued', 'running'].includes(document.getElementById('job-panel').dataset.status)"
                  " && !document.getElementById('cancel').disabled")
    p.click("#cancel")
    wait_js(page, "document.getElementById('job-panel').dataset.status === 'canceled'", 120)
    assert p.inner_text("#status").startswith("canceled (canceled:")
    assert p.is_hidden("#result") and page.outside == []
