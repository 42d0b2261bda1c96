"""A bounded load test on loopback: 10,000 submissions to a real uvicorn with every cap on, while a simulated
fleet drains the queue. Every answer must be 202, 429 or 503 (never another code, never a hang), every 429
must carry Retry-After and the JSON error, every 202'd job must exist afterwards, and the queue must stay
near its cap. Figures are printed (run with -s to see them)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis import Redis

from service.jobs import jobstore
from service.jobs.config import Settings
from tests.service.conftest import REDIS_URL, bearer, key_for

SUBMISSIONS = 10_000
CLIENTS = 8
TENANTS = 4  # tenant 0 sends half the traffic, so its own cap bites before the global one
DRAIN_PER_SECOND = 100  # the simulated fleet: jobs taken off the queue per second
MAX_QUEUED_TOTAL = 600
MAX_QUEUED_PER_TENANT = 250
DEADLINE_SECONDS = 120  # the test stops by itself, whatever happens


@pytest.fixture
def settings(prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=REDIS_URL, key_prefix=prefix, data_dir=tmp_path / "data", storage="local",
        rate_limit_per_second=40, rate_limit_burst=300,
        max_queued_per_tenant=MAX_QUEUED_PER_TENANT, max_queued_total=MAX_QUEUED_TOTAL,
    )


@pytest.fixture
def fast_cleanup(redis_conn: Redis, prefix: str) -> Iterator[None]:
    """Delete the jobs' RQ keys by name: the shared cleanup scans the DB once per job, too slow for thousands."""
    yield
    ids = [m.decode() for m in redis_conn.zrange(jobstore.Keys(prefix).jobs, 0, -1)]
    pipe = redis_conn.pipeline(transaction=False)
    for job_id in ids:
        pipe.delete(f"rq:job:{job_id}", f"rq:results:{job_id}", f"rq:job:{job_id}:dependents")
    pipe.delete(jobstore.Keys(prefix).jobs)
    pipe.execute()


def drain(r: Redis, prefix: str, stop: threading.Event) -> int:
    """Take jobs off the queue like a fleet of workers would (start, then finish) at DRAIN_PER_SECOND."""
    keys = jobstore.Keys(prefix)
    drained = 0
    while not stop.wait(0.05):
        for _ in range(DRAIN_PER_SECOND // 20):
            job_id = r.lpop(keys.rq_queue)
            if job_id is None:
                break
            token = jobstore.mark_running(r, job_id.decode(), "load-worker", prefix=prefix).token
            jobstore.mark_canceled(r, job_id.decode(), prefix=prefix, token=token, actor=token)  # no outputs
            drained += 1
    return drained


def test_bounded_load_with_caps_on(live_server, settings, redis_conn, fast_cleanup):
    keys = [key_for(settings, f"load-{t}") for t in range(TENANTS)]
    # Half the submissions from tenant 0, the rest spread over the others.
    plan = [0 if i % 2 == 0 else 1 + (i // 2) % (TENANTS - 1) for i in range(SUBMISSIONS)]
    answers: Counter[tuple[int, str]] = Counter()
    accepted: list[str] = []
    problems: list[str] = []
    max_depth = 0
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_SECONDS

    def client_loop(index: int) -> None:
        nonlocal max_depth
        mine = plan[index::CLIENTS]
        with httpx.Client(base_url=live_server, timeout=10) as client:
            for n, tenant in enumerate(mine):
                if time.monotonic() > deadline:
                    with lock:
                        problems.append("deadline reached")
                    return
                response = client.post("/v1/videos", json={"prompt": f"load {index}-{n}", "num_inference_steps": 1},
                                       headers=bearer(keys[tenant]))
                code = ""
                if response.status_code == 202:
                    job_id = response.json()["id"]
                elif response.status_code in (429, 503):
                    error = response.json()["error"]
                    code = error["code"]
                    if set(error) != {"type", "code", "message", "param"} or "retry-after" not in response.headers:
                        with lock:
                            problems.append(f"{response.status_code} without JSON error/Retry-After: {response.text}")
                else:
                    with lock:
                        problems.append(f"unexpected {response.status_code}: {response.text[:200]}")
                with lock:
                    answers[(response.status_code, code)] += 1
                    if response.status_code == 202:
                        accepted.append(job_id)
                if n % 100 == 0:
                    depth = redis_conn.llen(jobstore.Keys(settings.key_prefix).rq_queue)
                    with lock:
                        max_depth = max(max_depth, depth)

    stop = threading.Event()
    drained: list[int] = []
    drainer = threading.Thread(target=lambda: drained.append(drain(Redis.from_url(REDIS_URL), settings.key_prefix,
                                                                   stop)))
    drainer.start()
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client_loop, range(CLIENTS)))
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        drainer.join()

    total = sum(answers.values())
    rejected = total - len(accepted)
    summary = (
        f"load test: {total} submissions in {elapsed:.1f} s = {total / elapsed:.0f} req/s over {CLIENTS} clients; "
        f"accepted (202) {len(accepted)}, rejected {rejected}: "
        + ", ".join(f"{status} {code or 'accepted'} {count}" for (status, code), count in sorted(answers.items()))
        + f"; drained by the simulated fleet {drained[0] if drained else 0}; max queue depth seen {max_depth} "
        f"(cap {MAX_QUEUED_TOTAL})"
    )
    print("\n" + summary)  # noqa: T201  # the figures are this test's output
    assert not problems, problems[:5]
    assert total == SUBMISSIONS
    assert {status for status, _ in answers} <= {202, 429, 503}
    assert answers[(429, "rate_limited")] > 0 and answers[(429, "queue_full")] > 0
    assert answers[(429, "tenant_queue_full")] > 0
    # Every accepted job exists, once, with its tenant's index entry.
    assert len(set(accepted)) == len(accepted)
    pipe = redis_conn.pipeline(transaction=False)
    for job_id in accepted:
        pipe.hget(jobstore.Keys(settings.key_prefix).job(job_id), "status")
    statuses = Counter(s.decode() if s else None for s in pipe.execute())
    assert None not in statuses, statuses
    assert set(statuses) <= {"queued", "canceled"}
    queue = jobstore.Keys(settings.key_prefix).rq_queue
    assert statuses["queued"] == redis_conn.llen(queue)  # the rest were drained, none lost
    # The global cap holds, up to the submissions in flight when it was checked.
    assert max_depth <= MAX_QUEUED_TOTAL + CLIENTS
