"""Shared test fixtures: the repo root, the upstream reference vectors, a tiny model folder built once."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"
# Redis DB indexes the suite writes to on 127.0.0.1:6379 (service 11, worker/e2e 12, deploy 13, DB-14 blocks).
TEST_REDIS_DBS = (11, 12, 13, 14)


@pytest.fixture(scope="session", autouse=True)
def redis_left_as_found():
    """RQ writes keys outside our prefixes (`rq:job:<uuid>`, `rq:queues`, ...): after the session, delete
    every key the suite added to its DBs, so the machine's Redis is left as the suite found it."""
    import redis

    clients = {db: redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=2) for db in TEST_REDIS_DBS}
    try:
        before = {db: set(client.scan_iter(count=1000)) for db, client in clients.items()}
    except redis.RedisError:  # no Redis here: the tests that need it say so themselves
        yield
        return
    yield
    for db, client in clients.items():
        added = [key for key in client.scan_iter(count=1000) if key not in before[db]]
        for start in range(0, len(added), 500):
            client.delete(*added[start:start + 500])


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert REFERENCE_DIR.is_dir(), f"reference vectors missing at {REFERENCE_DIR}"
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The `tiny` pipeline folder, built once per test session (a few seconds, no downloads)."""
    from model.presets import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")
