"""The per-tenant queued counters behind admission control (service/jobs/admission.py), against real Redis: every
transition into or out of `queued` moves them exactly once, the reaper repairs drift, and a submission costs the
same Redis commands - in one round trip - whatever the backlog."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.asyncio.connection import Connection as AsyncConnection
from redis.connection import Connection
from rq import Queue

from service.api.app import create_app
from service.jobs import deletion, jobstore, queueing, reaper
from service.jobs.config import Settings
from service.jobs.schemas import JobStatus, Outputs, Timings, VideoOutput
from service.jobs.storage import LocalStorage
from tests.service.conftest import TENANT, bearer, queued_record
from tests.support import free_port, wait_for

OUTPUTS = Outputs(video=VideoOutput(url="/v1/videos/x/content", key="videos/x/video.mp4", bytes=10,
                                    content_type="video/mp4", width=64, height=64, frames=16, fps=8, duration_s=2.0))


def submit(r: Redis, settings: Settings, *, tenant: str = TENANT, age_s: float = 0) -> str:
    """A job created as the API creates it (RQ entry included), optionally `age_s` seconds old."""
    record = queued_record(tenant=tenant)
    if age_s:
        then = record.created_at - timedelta(seconds=age_s)
        record = record.model_copy(update={"created_at": then, "updated_at": then})
    queue = Queue(settings.queue_name, connection=r)
    jobstore.create(r, record, prefix=settings.key_prefix,
                    rq_entry=queueing.rq_entry(queue, settings, queueing.payload_of(record)))
    return record.id


def test_counts_move_once_per_transition_in_or_out_of_queued(redis_conn, settings):
    r, prefix = redis_conn, settings.key_prefix

    def count() -> int:
        return jobstore.queued_count(r, TENANT, prefix=prefix)

    ids = [submit(r, settings) for _ in range(6)]
    submit(r, settings, tenant="other")
    assert count() == 6 and jobstore.queued_count(r, "other", prefix=prefix) == 1

    run = jobstore.mark_running(r, ids[0], "w1", prefix=prefix)
    jobstore.mark_running(r, ids[0], "w1", prefix=prefix)  # a repeat (lost reply): the same run, no second move
    assert count() == 5
    jobstore.request_cancel(r, ids[1], prefix=prefix)  # queued -> canceled
    jobstore.request_cancel(r, ids[1], prefix=prefix)
    assert count() == 4
    jobstore.expire(r, ids[2], prefix=prefix, actor="reaper:x")
    jobstore.expire(r, ids[2], prefix=prefix, actor="reaper:x")  # the same actor repeating: ALREADY
    assert count() == 3
    deletion.delete_job(r, LocalStorage(settings.storage_dir), jobstore.get(r, ids[3], prefix=prefix), prefix=prefix)
    assert count() == 2
    jobstore.mark_requeued(r, ids[0], prefix=prefix, token=run.token, actor="reaper:x")  # running -> queued
    assert count() == 3
    run = jobstore.mark_running(r, ids[0], "w2", prefix=prefix)
    jobstore.mark_succeeded(r, ids[0], OUTPUTS, Timings(total_s=1.0), prefix=prefix, token=run.token)
    assert count() == 2  # running -> succeeded is no move
    run = jobstore.mark_running(r, ids[4], "w3", prefix=prefix)
    jobstore.request_cancel(r, ids[4], prefix=prefix)  # running -> canceling -> canceled: no move
    jobstore.mark_canceled(r, ids[4], prefix=prefix, token=run.token, actor=run.token)
    assert count() == 1
    deletion.delete_job(r, LocalStorage(settings.storage_dir), jobstore.get(r, ids[4], prefix=prefix), prefix=prefix)
    assert count() == 1  # deleting an ended job moves nothing

    # The reaper: a job of a dead worker goes back to the queue (+1); one that waited too long expires (-1).
    lost = submit(r, settings)
    jobstore.mark_running(r, lost, "dead-worker", prefix=prefix)
    stale = submit(r, settings, age_s=120)
    assert count() == 2
    done = reaper.reap(r, settings.model_copy(update={"queued_expiry_seconds": 60}))
    assert done == {lost: "requeued", stale: "expired"}
    assert count() == 2 and jobstore.get(r, lost, prefix=prefix).status == JobStatus.queued
    assert reaper.repair_queued_counts(r, prefix=prefix) == {}  # the counters were right all along


def test_the_reaper_repairs_drifted_counts(redis_conn, settings):
    r, prefix = redis_conn, settings.key_prefix
    for _ in range(3):
        submit(r, settings)
    counts = jobstore.Keys(prefix).queued_counts
    r.hset(counts, mapping={TENANT: 50, "gone": 4})  # a bug, a hand edit, a hash lost while queued
    assert reaper.repair_queued_counts(r, prefix=prefix) == {TENANT: (50, 3), "gone": (4, 0)}
    assert jobstore.queued_count(r, TENANT, prefix=prefix) == 3 and jobstore.queued_count(r, "gone", prefix=prefix) == 0
    assert reaper.repair_queued_counts(r, prefix=prefix) == {}


def test_the_script_writes_rq_entries_as_rq_does(redis_conn, settings):
    """Field for field the hash `Queue.enqueue_call` writes (bar its timestamp); a real worker runs it: the
    worker tests (tests/worker) submit every job this way."""
    r = redis_conn
    queue = Queue(settings.queue_name, connection=r)
    ours = submit(r, settings)
    theirs = jobstore.get(r, ours, prefix=settings.key_prefix)
    payload = queueing.payload_of(theirs)
    reference = payload.model_copy(update={"job_id": jobstore.new_job_id()})
    queueing.enqueue(r, settings, reference)
    written, expected = r.hgetall(f"rq:job:{ours}"), r.hgetall(f"rq:job:{reference.job_id}")
    assert written.keys() == expected.keys()
    different = {k for k in written if written[k] != expected[k]}
    assert different <= {b"enqueued_at", b"created_at", b"data", b"description"}, different
    assert queue.job_ids == [ours, reference.job_id]
    assert r.sismember("rq:queues", queue.key)


# --- cost of a submission --------------------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[str]:
    """A redis-server of our own, so that INFO commandstats counts only this test's commands."""
    if shutil.which("redis-server") is None:  # an environment problem: a failure, never a skip
        pytest.fail("no redis-server binary on PATH (apt-get install redis-server)", pytrace=False)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    try:
        wait_for(lambda: _answers(client), 10, "redis-server to answer")
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _answers(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def commandstats(r: Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in r.info("commandstats").items()}


def test_a_submission_is_one_round_trip_whatever_the_backlog(settings, api_key, private_redis, monkeypatch):
    """Caps and rate limit at their defaults; 90 jobs of the tenant waiting change nothing."""
    defaults = Settings()
    settings = settings.model_copy(update={
        "redis_url": private_redis, "rate_limit_burst": defaults.rate_limit_burst, "reaper_interval_seconds": 3600,
    })
    sent = [0]  # requests written to Redis by either client (the submission route uses the asyncio one)
    real_send, real_send_async = Connection.send_packed_command, AsyncConnection.send_packed_command

    def counted(self, command, check_health=True):
        sent[0] += 1
        return real_send(self, command, check_health)

    async def counted_async(self, command, check_health=True):
        sent[0] += 1
        return await real_send_async(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    monkeypatch.setattr(AsyncConnection, "send_packed_command", counted_async)
    r = Redis.from_url(private_redis)

    def cost_of_posts(client: TestClient, n: int) -> tuple[dict[str, float], float]:
        before, sends = commandstats(r), sent[0]
        for i in range(n):
            assert client.post("/v1/videos", json={"prompt": f"p{i}"}).status_code == 202
        trips = (sent[0] - sends) / n
        after = commandstats(r)
        delta = {k: (after[k] - before.get(k, 0)) / n for k in after if after[k] != before.get(k, 0)}
        delta.pop("cmdstat_info")
        return delta, trips

    with TestClient(create_app(settings), headers=bearer(api_key)) as client:
        assert client.post("/v1/videos", json={"prompt": "warm-up"}).status_code == 202  # loads the script
        empty, trips_empty = cost_of_posts(client, 3)
        for _ in range(90):
            submit(r, settings)
        backlog, trips_backlog = cost_of_posts(client, 3)
    assert jobstore.queued_count(r, TENANT, prefix=settings.key_prefix) == 97
    assert trips_empty == trips_backlog == 1
    assert empty == backlog, (empty, backlog)
    assert sum(empty.values()) <= 12, empty
    r.flushall()
