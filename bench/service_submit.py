"""POST /v1/videos throughput and latency on loopback, side by side with a bare FastAPI app that only
enqueues the same RQ job. The ratio (bora / bare) is the figure: what validation, admission (rate limit and
queue reservation), the job record, the single MULTI/EXEC and the middleware cost on top of a plain enqueue.

    .venv/bin/python bench/service_submit.py [--requests 1000] [--concurrency 16] [--rounds 2]

Both servers are real `uvicorn` processes (one worker each) against the same Redis (BORA_REDIS_URL or
127.0.0.1:6379, DB 13 by default) with a throw-away key prefix that is deleted afterwards. Rounds alternate
between the two apps so that machine noise hits both. The load generator shares the machine's cores.
The API runs with BORA_AUTH=disabled on 127.0.0.1 (one tenant) and admission limits that never refuse.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
BODY = {"prompt": "A cross-section of a beating human heart, ultrasound style", "num_frames": 16, "seed": 1}


# --- the bare baseline: parse JSON, enqueue the same RQ job, answer 202 ------------------------------------

def bare_app():  # uvicorn --factory bench.service_submit:bare_app
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from rq import Queue

    from service.jobs.config import get_settings
    from service.jobs.connection import connect

    settings = get_settings()
    queue = Queue(settings.queue_name, connection=connect(settings))
    app = FastAPI()

    @app.post("/v1/videos")
    def submit(body: dict) -> JSONResponse:
        job_id = "vid_" + uuid.uuid4().hex
        queue.enqueue_call("worker.jobs.run_video_job", args=({"job_id": job_id, "input": body},), job_id=job_id)
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    return app


# --- harness -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(target: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A uvicorn process; its stderr (the JSON logs, one audit line per job) goes to `log`."""
    port = free_port()
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", "--no-access-log"],
            cwd=REPO_ROOT, env=env, stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/docs", timeout=1)
            return process, base
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{target} did not start; see {log}")


async def load(base: str, requests: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        async def one_client() -> None:
            for _ in counter:
                t0 = time.perf_counter()
                response = await client.post("/v1/videos", json=BODY)
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 202:
                    raise RuntimeError(f"{response.status_code}: {response.text}")

        for _ in range(20):  # warm-up
            await client.post("/v1/videos", json=BODY)
        start_t = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start_t
    return requests / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-url", default=os.environ.get("BORA_REDIS_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()

    prefix = "bora-bench-" + secrets.token_hex(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env.update(BORA_REDIS_URL=args.redis_url, BORA_KEY_PREFIX=prefix, BORA_DATA_DIR=f"/tmp/{prefix}",
               BORA_JOB_RETENTION_SECONDS="600", PYTHONPATH=str(REPO_ROOT),
               # No keys on loopback: every request is tenant `default`. The token bucket still runs (one Lua
               # call per request) but never refuses; the queue caps are off (0), yet the reservation script
               # still runs and scans the tenant's pending set, which grows by every request here (no worker).
               BORA_AUTH="disabled", BORA_HOST="127.0.0.1",
               BORA_RATE_LIMIT_PER_SECOND="1000000", BORA_RATE_LIMIT_BURST="1000000000",
               BORA_MAX_QUEUED_PER_TENANT="0", BORA_MAX_QUEUED_TOTAL="0")
    data_dir = Path(env["BORA_DATA_DIR"])
    data_dir.mkdir(parents=True, exist_ok=True)
    servers = {
        "bora API": start(["service.main:app"], env, data_dir / "api.log"),
        "bare enqueue": start(["--factory", "bench.service_submit:bare_app"], env, data_dir / "bare.log"),
    }
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, (_, base) in servers.items():
                results[name].append(asyncio.run(load(base, args.requests, args.concurrency)))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)
        from redis import Redis

        r = Redis.from_url(args.redis_url)
        doomed = list(r.scan_iter(f"{prefix}:*", count=1000)) + list(r.scan_iter(f"rq:*{prefix}-videos*"))
        for key in r.scan_iter("rq:job:vid_*", count=5000):
            if r.hget(key, "origin") == f"{prefix}-videos".encode():
                doomed.append(key)
        for i in range(0, len(doomed), 1000):
            r.delete(*doomed[i:i + 1000])
        r.srem("rq:queues", f"rq:queue:{prefix}-videos")
    shutil.rmtree(data_dir, ignore_errors=True)  # kept when a server failed: its log is there

    print(f"POST /v1/videos on loopback: {args.requests} requests × {args.rounds} rounds, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs shared with the load generator")
    print(f"{'app':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  req/s by round")
    summary = {}
    for name, runs in results.items():
        rps = statistics.median(rate for rate, _ in runs)
        latencies = [x for _, lat in runs for x in lat]
        summary[name] = (rps, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3)
        by_round = " ".join(f"{rate:.0f}" for rate, _ in runs)
        print(f"{name:<14} {rps:8.0f} {summary[name][1]:8.1f} {summary[name][2]:8.1f}  {by_round}")
    ours, bare = summary["bora API"], summary["bare enqueue"]
    print(f"throughput ratio bora/bare = {ours[0] / bare[0]:.2f}; "
          f"p50 ratio = {ours[1] / bare[1]:.2f}; p99 ratio = {ours[2] / bare[2]:.2f}")


if __name__ == "__main__":
    main()
