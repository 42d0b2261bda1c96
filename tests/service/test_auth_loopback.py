"""BORA_AUTH=disabled serves only requests that arrive on a loopback address, also when the server was started
by hand on every interface (`uvicorn service.main:app --host 0.0.0.0`, which never reads BORA_HOST)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import DEFAULT_TENANT
from service.jobs.config import is_loopback
from tests.service.conftest import bora_env
from tests.support import REPO_ROOT, free_port, stop_processes, wait_http


def assert_refused_off_loopback(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "auth_disabled_off_loopback" and "loopback" in error["message"]


@pytest.mark.parametrize("server", ["10.1.2.3", "192.0.2.2", "[2001:db8::1]", "bora.example"])
def test_protected_routes_refuse_requests_off_loopback(settings, server):
    app = create_app(settings.model_copy(update={"auth": "disabled"}))
    with TestClient(app, base_url=f"http://{server}:8000", raise_server_exceptions=False) as client:
        assert_refused_off_loopback(client.post("/v1/videos", json={"prompt": "p"}))
        assert_refused_off_loopback(client.get("/v1/videos"))
        assert client.get("/healthz").status_code == 200  # what stays open with auth on stays open here


@pytest.mark.parametrize("server", ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"])
def test_loopback_requests_are_tenant_default(settings, redis_conn, server):
    app = create_app(settings.model_copy(update={"auth": "disabled"}))
    with TestClient(app, base_url=f"http://{server}:8000") as client:
        job = client.post("/v1/videos", json={"prompt": "p"})
        assert job.status_code == 202, job.text
        assert client.get(f"/v1/videos/{job.json()['id']}").json()["id"] == job.json()["id"]
    assert redis_conn.zcard(f"{settings.key_prefix}:tenant:{DEFAULT_TENANT}:jobs") == 1


def test_ipv4_mapped_loopback_is_loopback():
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("::ffff:10.0.0.1")


def non_loopback_address() -> str | None:
    """One of this machine's own addresses that is not loopback (`hostname -I`), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    for address in out:
        if ipaddress.ip_address(address).version == 4 and not is_loopback(address):
            return address
    return None


def test_uvicorn_on_every_interface_serves_loopback_only(settings, tmp_path):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect to")
    port = free_port()
    log = tmp_path / "api.log"
    with open(log, "wb") as out:  # BORA_HOST unset: the settings check passes, the bind is 0.0.0.0 all the same
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", str(port)],
            cwd=REPO_ROOT, env=bora_env(settings, BORA_AUTH="disabled"), stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, 30, "uvicorn", log)
        # The same machine, through its non-loopback address: the request arrives off loopback.
        outside = httpx.Client(base_url=f"http://{address}:{port}", timeout=10, trust_env=False)
        assert_refused_off_loopback(outside.post("/v1/videos", json={"prompt": "p"}))
        assert outside.get("/healthz").status_code == 200
        inside = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False)
        assert inside.post("/v1/videos", json={"prompt": "p"}).status_code == 202
    finally:
        stop_processes([process], timeout=10)
