"""API keys on the HTTP edge: 401s, exempt routes, tenant isolation on every job route, `bora keys` against a
live API, and BORA_AUTH=disabled (loopback only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.api.auth import DEFAULT_TENANT
from service.jobs import jobstore
from service.jobs.config import Settings
from service.keys import revoke_key
from tests.service.conftest import (
    REPO_ROOT,
    TENANT,
    bearer,
    bora_env,
    finish_like_worker,
    key_for,
    queued_record,
)
from tests.support import free_port

ERROR_FIELDS = {"type", "code", "message", "param"}


def assert_401(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["type"] == "authentication_error" and error["code"] == code


@pytest.fixture
def anonymous(settings: Settings, api_key: str):
    """The app with auth on (a key exists), but a client that sends none by itself."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_missing_malformed_wrong_and_revoked_keys_are_401(anonymous, settings, api_key):
    job_id = anonymous.post("/v1/videos", json={"prompt": "p"}, headers=bearer(api_key)).json()["id"]
    key_id = api_key.split("_")[1]
    routes = [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("POST", "/generate"), ("GET", f"/v1/videos/{job_id}"),
              ("GET", f"/v1/videos/{job_id}/content"), ("POST", f"/v1/videos/{job_id}/cancel"),
              ("GET", f"/v1/videos/{job_id}/events"), ("GET", "/v1/anything-else")]
    for method, path in routes:
        assert_401(anonymous.request(method, path), "missing_api_key")
        for header in [f"Basic {api_key}", "Bearer", "Bearer ", api_key]:
            assert_401(anonymous.request(method, path, headers={"Authorization": header}), "missing_api_key")
        for wrong in [api_key[:-2] + ("xy" if not api_key.endswith("xy") else "zz"), "bora_nope_secret", "garbage",
                      f"bora_{key_id}_"]:
            assert_401(anonymous.request(method, path, headers=bearer(wrong)), "invalid_api_key")
    # The scheme is case-insensitive; the key works everywhere.
    assert anonymous.get(f"/v1/videos/{job_id}", headers={"Authorization": f"bearer {api_key}"}).status_code == 200
    # 401 comes before the body is even parsed: an anonymous client learns nothing about validation.
    bad_json = {"content-type": "application/json"}
    assert_401(anonymous.post("/v1/videos", content=b"{not json", headers=bad_json), "missing_api_key")
    # Revoked: refused at the next request, no restart.
    assert revoke_key(settings.api_keys_file, key_id)
    assert_401(anonymous.get(f"/v1/videos/{job_id}", headers=bearer(api_key)), "invalid_api_key")
    # Nothing was created by any refused request.
    assert [j.id for j in jobstore.list_jobs(anonymous.app.state.api.redis, 100, tenant=TENANT,
                                             prefix=settings.key_prefix)[0]] == [job_id]


def test_health_metrics_and_docs_are_open_by_default(anonymous):
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code == 503  # no worker: open, and it says so
    assert anonymous.get("/metrics").status_code == 200
    assert anonymous.get("/docs").status_code == 200
    spec = anonymous.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from `bora keys create --tenant NAME`."
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            protected = path.startswith("/v1") or path == "/generate"
            assert ("security" in operation) == protected, path
            assert ("401" in operation["responses"]) == protected, path
            if protected:
                assert operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorBody")


def test_health_and_metrics_can_be_protected(settings, api_key):
    settings = settings.model_copy(update={"auth_protect_health": True, "auth_protect_metrics": True})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for path in ["/healthz", "/readyz", "/metrics"]:
            assert_401(c.get(path), "missing_api_key")
        assert c.get("/healthz", headers=bearer(api_key)).status_code == 200
        assert c.get("/metrics", headers=bearer(api_key)).status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert "security" in c.get("/openapi.json").json()["paths"]["/healthz"]["get"]


def test_every_job_route_is_404_for_another_tenant(client, redis_conn, settings):
    """Walks the OpenAPI paths, so a job route added later is covered without editing this test."""
    mine = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    theirs = queued_record(tenant="hospital-b")
    jobstore.create(redis_conn, theirs, prefix=settings.key_prefix)
    finish_like_worker(redis_conn, settings, theirs.id, b"\x00" * 64, b"\xff\xd8 jpeg")
    other = bearer(key_for(settings, "hospital-b"))

    spec = client.get("/openapi.json").json()
    job_routes = [(method.upper(), path) for path, operations in spec["paths"].items() if "{job_id}" in path
                  for method in operations]
    job_routes.sort(key=lambda route: route[0] == "DELETE")  # the owner's DELETE ends the job: last
    paths = {path for _, path in job_routes}
    for expected in ["/v1/videos/{job_id}", "/v1/videos/{job_id}/content", "/v1/videos/{job_id}/cancel",
                     "/v1/videos/{job_id}/events"]:
        assert expected in paths, f"{expected} missing: {sorted(paths)}"
    for method, template in job_routes:
        variants = ["video", "thumbnail", "metadata"] if template.endswith("/content") else [None]
        for variant in variants:
            params = {"variant": variant} if variant else None
            response = client.request(method, template.format(job_id=theirs.id), params=params)
            assert response.status_code == 404, (method, template, variant, response.text)
            assert response.json()["error"]["code"] == "job_not_found"
            # The owner gets past the tenant check on the same route (not 404 job_not_found).
            owner = client.request(method, template.format(job_id=theirs.id), params=params, headers=other)
            assert owner.status_code != 404 or owner.json()["error"]["code"] != "job_not_found", (method, template)
    assert client.head(f"/v1/videos/{theirs.id}/content").status_code == 404
    # The owner's DELETE (last) removed their job; nobody else could touch it before. Each list shows only its
    # own tenant's jobs.
    assert jobstore.get(redis_conn, theirs.id, prefix=settings.key_prefix) is None
    assert [j["id"] for j in client.get("/v1/videos").json()["data"]] == [mine]
    assert [j["id"] for j in client.get("/v1/videos", headers=other).json()["data"]] == []
    assert client.get(f"/v1/videos/{mine}", headers=other).status_code == 404


def test_the_job_and_its_payload_carry_the_callers_tenant(client, redis_conn, settings):
    from rq.job import Job

    job_id = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    assert jobstore.get(redis_conn, job_id, prefix=settings.key_prefix).tenant == TENANT
    assert Job.fetch(job_id, connection=redis_conn).args[0]["tenant"] == TENANT
    assert redis_conn.zscore(jobstore.Keys(settings.key_prefix).tenant_jobs(TENANT), job_id) is not None


def test_auth_disabled_is_tenant_default_on_loopback_only(settings, redis_conn):
    for host in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]:
        Settings(auth="disabled", host=host)
    for host in ["0.0.0.0", "10.1.2.3", "::", "bora.example"]:
        with pytest.raises(ValidationError, match="BORA_AUTH=disabled is refused"):
            Settings(auth="disabled", host=host)
    with TestClient(create_app(settings.model_copy(update={"auth": "disabled"})), base_url="http://127.0.0.1") as c:
        job_id = c.post("/v1/videos", json={"prompt": "p"}).json()["id"]
        assert jobstore.get(redis_conn, job_id, prefix=settings.key_prefix).tenant == DEFAULT_TENANT
        assert c.get(f"/v1/videos/{job_id}").status_code == 200
        assert "bearerAuth" not in c.get("/openapi.json").text


def test_auth_disabled_on_a_public_address_refuses_to_start(settings):
    env = bora_env(settings, BORA_AUTH="disabled", BORA_HOST="0.0.0.0")
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "BORA_AUTH=disabled is refused with BORA_HOST=0.0.0.0" in result.stderr


def bora_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "bora"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
    return subprocess.run([*command, "keys", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_bora_keys_cli_against_a_live_api(live_server, settings):
    # The CLI finds the API's key file from BORA_DATA_DIR alone, as the API does.
    env = bora_env(settings)
    del env["BORA_API_KEYS_FILE"]
    created = bora_cli("create", "--tenant", "clinic-7", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("bora_") and key not in settings.api_keys_file.read_text()
    assert settings.api_keys_file == settings.data_dir / "api-keys.json"

    with httpx.Client(base_url=live_server, timeout=5, headers=bearer(key)) as client:
        response = client.post("/v1/videos", json={"prompt": "a cell dividing"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert client.get(f"/v1/videos/{job_id}").status_code == 200

        listed = bora_cli("list", env=env)
        key_id = key.split("_")[1]
        assert f"{key_id}\tclinic-7\t" in listed.stdout and "active" in listed.stdout
        assert key.split("_", 2)[2] not in listed.stdout
        revoked = bora_cli("revoke", key_id, env=env)
        assert revoked.returncode == 0, revoked.stderr
        assert_401(client.get(f"/v1/videos/{job_id}"), "invalid_api_key")
        assert "revoked" in bora_cli("list", env=env).stdout
    assert_401(httpx.get(f"{live_server}/v1/videos", timeout=5), "missing_api_key")


def test_auth_is_required_by_default(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.auth == "required" and settings.api_keys_file == tmp_path / "api-keys.json"
    assert not settings.auth_protect_health and not settings.auth_protect_metrics
    with TestClient(create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))) as c:
        assert_401(c.get("/v1/videos"), "missing_api_key")  # no key file yet: nobody gets in
