"""A reachable Redis that refuses writes - full (OOM under `noeviction`), a read-only replica, a failed RDB save
(MISCONF) - makes a submission answer 503 JSON `redis_unavailable` with Retry-After, never 500; reads still
work. Each test runs its OWN redis-server on a spare loopback port (never the machine's Redis on 6379)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from service.api.app import create_app
from service.api.handlers import redis_refusal
from service.jobs.config import Settings
from tests.service.conftest import TENANT, bearer, key_for
from tests.support import free_port, stop_processes, wait_for

ERROR_FIELDS = {"type", "code", "message", "param"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Redis]:
    if shutil.which("redis-server") is None:  # pragma: no cover - environment problem: a failure, never a skip
        pytest.fail("no redis-server binary on PATH (apt-get install redis-server)", pytrace=False)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path), "--save", "3600 1",
         "--appendonly", "no", "--maxmemory-policy", "noeviction", "--enable-protected-configs", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    r = Redis(port=port, socket_timeout=5)

    def answers() -> bool:
        with contextlib.suppress(RedisError):
            return bool(r.ping())
        return False

    try:
        wait_for(answers, 10, "redis-server to answer")
        yield r
    finally:
        with contextlib.suppress(RedisError):
            r.config_set("save", "")  # so that SIGTERM exits at once, without a (failing) snapshot
        r.close()
        stop_processes([process], timeout=10)


def client_of(r: Redis, tmp_path: Path, **overrides) -> TestClient:
    port = r.connection_pool.connection_kwargs["port"]
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{port}/0", data_dir=tmp_path / "data", reaper_in_api=False, **overrides
    )
    return TestClient(create_app(settings), raise_server_exceptions=False, headers=bearer(key_for(settings, TENANT)))


def assert_refused(response, refusal: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["code"] == "redis_unavailable" and refusal in error["message"]
    assert int(response.headers["retry-after"]) >= 1


def fill(r: Redis) -> None:
    r.config_set("maxmemory", "1mb")
    with pytest.raises(OutOfMemoryError):
        for i in range(1000):
            r.set(f"filler:{i}", "x" * 10_000)


# The first write of a submission is the rate-limit script; with admission control off, it is the MULTI/EXEC
# that stores the job and its RQ entry (a pipeline reports the error of one of its commands).
@pytest.mark.parametrize("admission", [{}, {"rate_limit_per_second": 0, "max_queued_per_tenant": 0,
                                             "max_queued_total": 0}], ids=["rate-limit-script", "transaction"])
def test_a_full_redis_is_503_not_500(own_redis, tmp_path, admission):
    with client_of(own_redis, tmp_path, **admission) as client:
        fill(own_redis)
        assert_refused(client.post("/v1/videos", json={"prompt": "a beating heart"}), "OOM")
        assert_refused(client.post("/v1/videos", json={"prompt": "a"}, headers={"Idempotency-Key": "k1"}), "OOM")
        assert client.get("/v1/videos").status_code == 200  # reads still work
        own_redis.config_set("maxmemory", "0")  # room again: the same request goes through
        assert client.post("/v1/videos", json={"prompt": "a beating heart"}).status_code == 202


def test_a_read_only_replica_is_503(own_redis, tmp_path):
    with client_of(own_redis, tmp_path) as client:
        own_redis.replicaof("127.0.0.1", str(free_port()))  # a master that never answers: read-only, stays so
        assert_refused(client.post("/v1/videos", json={"prompt": "a beating heart"}), "READONLY")


def test_a_failed_rdb_save_is_503(own_redis, tmp_path):
    with client_of(own_redis, tmp_path) as client:
        own_redis.config_set("dir", "/proc")  # nobody, not even root, may create files there
        own_redis.bgsave()
        wait_for(lambda: own_redis.info("persistence")["rdb_last_bgsave_status"] == "err", 10, "the save to fail")
        assert_refused(client.post("/v1/videos", json={"prompt": "a beating heart"}), "MISCONF")


def test_other_redis_errors_stay_500(own_redis, tmp_path):
    """A reply that is our bug (here WRONGTYPE: the rate-limit key is not a string) is a 500, not a 503."""
    with client_of(own_redis, tmp_path) as client:
        own_redis.hset(f"bora:rate:{TENANT}", "tokens", "not a string")
        response = client.post("/v1/videos", json={"prompt": "a beating heart"})
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"


def test_refusal_codes_are_read_from_plain_and_pipeline_replies():
    from redis.exceptions import ResponseError

    assert redis_refusal(OutOfMemoryError("command not allowed", status_code="OOM")) == "OOM"
    assert redis_refusal(ResponseError("MISCONF Redis is configured to save RDB snapshots")) == "MISCONF"
    piped = ResponseError("Command # 2 (HSET k f v) of pipeline caused error: NOREPLICAS Not enough good replicas")
    assert redis_refusal(piped) == "NOREPLICAS"
    assert redis_refusal(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")) is None
    assert redis_refusal(ResponseError("ERR user script said OOM")) is None
