"""`bora submit "prompt" --wait --out video.mp4` against the running service."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.client.stack import Stack

BORA = Path(sys.executable).parent / "bora"


def run(args: list[str], stack: Stack, key: str | None, base: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env["BORA_BASE_URL"] = base or stack.base
    if key:
        env["BORA_API_KEY"] = key
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)


def test_bora_submit_wait_out(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "video.mp4"
    done = run([str(BORA), "submit", "A cardiac MRI, short axis", "--wait", "--out", str(out), "--frames", "8",
                "--height", "32", "--width", "48", "--steps", "2", "--sampler", "ddim", "--seed", "5",
                "--metadata", "case=42", "--json"], stack, stack.key)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["seed"] == 5 and job["metadata"] == {"case": "42"}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == job["outputs"]["video"]["sha256"]
    assert "submitted vid_" in done.stderr and "sha256 checked" in done.stderr and "100%" in done.stderr


def test_client_cli_without_waiting_and_with_auth_off(stack: Stack) -> None:
    submitted = run([sys.executable, "-m", "bora_client", "submit", "Cells dividing under a microscope",
                     "--frames", "8", "--height", "32", "--width", "48", "--steps", "2"], stack, None,
                    base=stack.open_base)
    assert submitted.returncode == 0, submitted.stderr
    job_id, status = submitted.stdout.split()
    assert job_id.startswith("vid_") and status == "queued"


def test_bora_submit_errors(stack: Stack) -> None:
    refused = run([str(BORA), "submit", "anything", "--wait"], stack, "bora_wrong")
    assert refused.returncode == 1 and "401 invalid_api_key" in refused.stderr
    assert "Traceback" not in refused.stderr
    invalid = run([str(BORA), "submit", "anything", "--height", "40"], stack, stack.key)
    assert invalid.returncode == 1 and "body.height" not in invalid.stdout and "422" in invalid.stderr
    usage = run([str(BORA), "submit", "anything", "--metadata", "novalue"], stack, stack.key)
    assert usage.returncode == 2
