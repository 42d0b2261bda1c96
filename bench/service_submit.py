"""The API's hot path, POST /v1/videos and GET /v1/videos/{id}, side by side with a bare FastAPI app, on loopback.

    .venv/bin/python bench/service_submit.py [--rounds 6] [--posts 900] [--get-seconds 4] [--connections 8]

What runs: two real `uvicorn` processes, one worker each, started the way docker/Dockerfile.api starts the API
(uvloop + httptools, access log on, `--no-server-header`), each with its output going to a file:
- bora: `service.main:app` as deployed - auth required with real API keys (64 tenants, one key each), the rate
  limit and both queue caps at their defaults (2/s burst 20 per tenant; 100 queued per tenant; 1000 in all),
  the reaper thread on;
- bare: a FastAPI app whose POST validates the same pydantic body (`VideoCreate`) and does one RQ
  `enqueue_call` of the same function, and whose GET reads the RQ job hash (one HGETALL) - no auth, no limits.
Both use one redis-server of the bench's own (no persistence), so INFO commandstats counts only their commands.
The load generator is `wrk` (compiled; 2 threads, `--connections` connections), its Lua script rotating over
the 64 keys. Each wrk thread of a POST round stops after `--posts`/2 answers: with the default caps, 64 tenants x burst 20
and a global cap of 1000 admit every one of them, so every POST is a 202 that creates a job (any other status
fails the run). POST throughput is taken from the jobs themselves (first to last RQ `enqueued_at`, the same
for both apps); latencies come from wrk. Redis is flushed before every round, and rounds alternate between the apps (A B, B A, ...).

Printed: per app the median over rounds of req/s, p50 and p99 (wrk's latency distribution), and the ratios
bora/bare; Redis commands per created job (commandstats delta / jobs in the queue) broken down by command.
Not measured: TLS, a remote Redis (every round trip here costs loopback only), several API processes, a worker
draining the queue, refusals (429) and Idempotency-Key replays. The load generator, both servers and Redis
share this machine's cores, so absolute numbers depend on its load; the ratios side by side are the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from redis import Redis

from service.jobs.schemas import VideoCreate  # at module level: FastAPI resolves the route's annotations here

REPO_ROOT = Path(__file__).resolve().parents[1]
BODY = {"prompt": "A cross-section of a beating human heart, ultrasound style", "num_frames": 16, "seed": 1}
TENANTS = 64
PREFIX = "bench"


# --- the bare baseline -------------------------------------------------------------------------------------

def bare_app():  # uvicorn --factory bench.service_submit:bare_app
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from rq import Queue

    from service.jobs.config import get_settings
    from service.jobs.connection import connect
    from service.jobs.queueing import WORKER_FUNCTION

    settings = get_settings()
    redis = connect(settings)
    queue = Queue(settings.queue_name, connection=redis)
    app = FastAPI()

    @app.post("/v1/videos", status_code=202)
    def submit(body: VideoCreate) -> dict[str, str]:
        job_id = "vid_" + os.urandom(16).hex()
        queue.enqueue_call(WORKER_FUNCTION, args=({"job_id": job_id, "input": body.model_dump(mode="json")},),
                           job_id=job_id)
        return {"id": job_id, "status": "queued"}

    @app.get("/v1/videos/{job_id}")
    def read(job_id: str) -> JSONResponse:
        fields = redis.hgetall(f"rq:job:{job_id}")
        if not fields:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse({"id": job_id, "status": fields[b"status"].decode(),
                             "description": fields.get(b"description", b"").decode()})

    return app


# --- harness -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start; see {log}")


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = folder / "redis.log"
    process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--logfile", str(log)])
    wait_port(port, process, "redis-server", log)
    return process, f"redis://127.0.0.1:{port}/0"


def start_app(target: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`uvicorn` with the flags of docker/Dockerfile.api (access log and log level left at their defaults)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port),
             "--no-server-header", "--timeout-graceful-shutdown", "20", "--loop", "uvloop", "--http", "httptools"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=out,
        )
    wait_port(port, process, " ".join(target), log)
    return process, f"http://127.0.0.1:{port}"


WRK_SCRIPT = """
local keys = {%(keys)s}
local body = %(body)s
local method, path, stop_after = "%(method)s", "%(path)s", %(stop_after)d
local counter, sent, answered = 1, 0, 0
function setup(thread) thread:set("offset", counter * 17); counter = counter + 1 end
function request()
  sent = sent + 1
  local headers = {["Authorization"] = "Bearer " .. keys[((offset or 0) + sent) %% #keys + 1]}
  if body then headers["Content-Type"] = "application/json" end
  return wrk.format(method, path, headers, body)
end
function response(status, headers, response_body)
  answered = answered + 1
  if stop_after > 0 and answered >= stop_after then wrk.thread:stop() end
end
function done(summary, latency, requests)
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
    '"non_2xx": %%d, "socket_errors": %%d}\\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), summary.errors.status, summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout))
end
"""


def run_wrk(folder: Path, base: str, *, method: str, path: str, keys: list[str], body: str | None,
            connections: int, seconds: int = 60, stop_after: int = 0,
            until: Callable[[], bool] | None = None) -> dict[str, float]:
    """One wrk run for `seconds`; or each of its threads stops after `stop_after` answers, and wrk is
    interrupted once `until()` holds (wrk's own duration then includes this poll's lag: take the throughput
    from the server side, `enqueue_rate`). Every answer must be a 2xx."""
    script = folder / f"{method.lower()}.lua"
    script.write_text(WRK_SCRIPT % {
        "keys": ", ".join(json.dumps(k) for k in keys), "body": json.dumps(body) if body else "nil",
        "method": method, "path": path, "stop_after": stop_after,
    })
    wrk = subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                            base + path], stdout=subprocess.PIPE, text=True)
    if until is not None:
        while wrk.poll() is None and not until():
            time.sleep(0.005)
        wrk.send_signal(signal.SIGINT)
    out, _ = wrk.communicate(timeout=seconds + 30)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    if result["non_2xx"] or result["socket_errors"]:
        raise RuntimeError(f"{method} {path}: not every answer was a 2xx: {result}\n{out}")
    return {"rps": result["requests"] / (result["duration_us"] / 1e6), "p50_ms": result["p50_us"] / 1e3,
            "p99_ms": result["p99_us"] / 1e3, "requests": result["requests"]}


def enqueue_rate(r: Redis, queue_key: str) -> float:
    """Jobs per second from the first job's RQ `enqueued_at` to the last one's: the same clock for both apps,
    unaffected by wrk's start or by when the harness noticed the round was over."""
    pipe = r.pipeline(transaction=False)
    for job_id in r.lrange(queue_key, 0, -1):
        pipe.hget(b"rq:job:" + job_id, "enqueued_at")
    stamps = sorted(datetime.fromisoformat(t.decode().replace("Z", "+00:00")).timestamp() for t in pipe.execute())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def commandstats(r: Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in r.info("commandstats").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per app and request kind")
    parser.add_argument("--posts", type=int, default=900, help="POSTs per round (keep under the global cap, 1000)")
    parser.add_argument("--get-seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        sys.exit("needs wrk and redis-server on PATH (apt-get install wrk redis-server)")

    from service.jobs.config import Settings
    from service.keys import create_key

    folder = Path(tempfile.mkdtemp(prefix="bora-bench-"))
    redis_process, redis_url = start_redis(folder)
    keys_file = folder / "api-keys.json"
    keys = [create_key(keys_file, f"tenant-{i:02d}") for i in range(TENANTS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env.update(BORA_REDIS_URL=redis_url, BORA_KEY_PREFIX=PREFIX, BORA_DATA_DIR=str(folder / "data"),
               BORA_API_KEYS_FILE=str(keys_file), PYTHONPATH=str(REPO_ROOT))
    defaults = Settings(redis_url=redis_url)
    apps = {
        "bora": start_app(["service.main:app"], env, folder / "bora.log"),
        "bare": start_app(["--factory", "bench.service_submit:bare_app"], env, folder / "bare.log"),
    }
    r = Redis.from_url(redis_url)
    queue_key = f"rq:queue:{PREFIX}-videos"
    body = json.dumps(BODY)
    posts: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    gets: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    commands: list[dict[str, float]] = []
    try:
        def jobs_reach(n: int) -> Callable[[], bool]:
            return lambda: r.llen(queue_key) >= n

        for _, base in apps.values():  # warm-up: imports, the script cache, every key verified once
            r.flushall()
            run_wrk(folder, base, method="POST", path="/v1/videos", keys=keys, body=body,
                    connections=args.connections, stop_after=2 * TENANTS, until=jobs_reach(4 * TENANTS))
        order = list(apps)
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                r.flushall()
                before = commandstats(r)
                run = run_wrk(folder, apps[name][1], method="POST", path="/v1/videos", keys=keys, body=body,
                              connections=args.connections, stop_after=args.posts // 2,
                              until=jobs_reach(args.posts // 2 * 2))
                after, jobs = commandstats(r), r.llen(queue_key)
                posts[name].append(run | {"rps": enqueue_rate(r, queue_key)})
                if name == "bora":
                    commands.append({c: (n - before.get(c, 0)) / jobs for c, n in after.items()
                                     if c not in ("info", "llen", "flushall") and n != before.get(c, 0)})
        targets: dict[str, str] = {}
        r.flushall()
        for name, (_, base) in apps.items():  # one queued job each, read by every GET
            request = urllib.request.Request(base + "/v1/videos", data=body.encode(), method="POST", headers={
                "Authorization": f"Bearer {keys[0]}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                targets[name] = json.loads(answer.read())["id"]
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                gets[name].append(run_wrk(folder, apps[name][1], method="GET", path=f"/v1/videos/{targets[name]}",
                                          keys=keys[:1], body=None, connections=args.connections,
                                          seconds=args.get_seconds))
    finally:
        for process, _ in apps.values():
            process.terminate()
            process.wait(timeout=30)
        redis_process.terminate()
        redis_process.wait(timeout=30)

    report(args, defaults, posts, gets, commands)
    shutil.rmtree(folder, ignore_errors=True)  # kept when a server failed: its log is there


def report(args: Any, defaults: Any, posts: dict[str, list[dict[str, float]]], gets: dict[str, list[dict[str, float]]],
           commands: list[dict[str, float]]) -> None:
    def median(runs: list[dict[str, float]], field: str) -> float:
        return statistics.median(run[field] for run in runs)

    print(f"bora API vs bare FastAPI+RQ, loopback, {args.connections} connections, wrk -t2, {args.rounds} interleaved "
          f"rounds each, {os.cpu_count()} CPUs shared by wrk, both servers and Redis; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"bora as deployed: auth required (64 tenants), rate limit {defaults.rate_limit_per_second:g}/s burst "
          f"{defaults.rate_limit_burst}, caps {defaults.max_queued_per_tenant}/tenant {defaults.max_queued_total} "
          "in all, access log on")
    print(f"{'request':<22} {'app':<5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}   req/s by round")
    for label, runs in ((f"POST ({args.posts}/round)", posts), (f"GET ({args.get_seconds} s/round)", gets)):
        for name in ("bora", "bare"):
            by_round = " ".join(f"{run['rps']:.0f}" for run in runs[name])
            print(f"{label:<22} {name:<5} {median(runs[name], 'rps'):7.0f} {median(runs[name], 'p50_ms'):7.1f} "
                  f"{median(runs[name], 'p99_ms'):7.1f}   {by_round}")
        rps = median(runs["bora"], "rps") / median(runs["bare"], "rps")
        p99 = median(runs["bora"], "p99_ms") / median(runs["bare"], "p99_ms")
        print(f"{label:<22} ratio bora/bare: throughput {rps:.2f}x, p99 {p99:.2f}x")
    # The API's reaper thread (every 10 s, as deployed) adds its own commands to a round it falls into: count
    # the round with the fewest, and say how many the busiest had.
    per_job = min(commands, key=lambda run: sum(run.values()))
    breakdown = ", ".join(f"{c} {n:.2f}" for c, n in sorted(per_job.items(), key=lambda item: -item[1]) if n >= 0.05)
    print(f"Redis commands per bora POST (INFO commandstats delta / jobs created, quietest round): "
          f"{sum(per_job.values()):.2f} ({breakdown}); busiest round {max(sum(run.values()) for run in commands):.2f}"
          " (a reaper pass fell into it)")
    print("  every command but evalsha ran inside the create script: one round trip per POST "
          "(tests/service/test_queued_counts.py counts the round trips)")
    print("not measured: TLS, remote Redis, several API processes, a worker draining the queue, 429s, replays")


if __name__ == "__main__":
    main()
