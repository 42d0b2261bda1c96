"""Enqueue → start latency of an idle worker on loopback: Bora's resident-model worker (`python -m worker.main`)
side by side with a bare RQ `SimpleWorker` running a no-op. The ratio (bora / bare) is the figure: what Bora
adds between a job entering the queue and it being marked running, over RQ's own dequeue.

    .venv/bin/python bench/worker_pickup.py [--jobs 40] [--gap 0.25]

Bora: jobs go through the real API (a `uvicorn` process, BORA_AUTH=disabled on 127.0.0.1) and the figure is
`started_at − created_at` from the job record (created_at is stamped by the API before its MULTI/EXEC,
started_at by the worker's queued → running transition). Bare: the bench enqueues `os.getpid` on another
queue and the figure is `started_at − enqueued_at` from RQ's job hash. The RQ timestamps of Bora's jobs split
its figure into API (created → enqueued), RQ dequeue (enqueued → RQ started) and job start (RQ started →
running: payload validation, the running transition, its read-back). RQ stamps `enqueued_at` when the API
queues the job on its transaction, so Bora's "RQ dequeue" part also holds the rest of that MULTI/EXEC.

Each job is submitted only after the previous one finished (both its record and RQ's bookkeeping) and `--gap`
seconds passed, so the worker is idle, blocked on the queue, when the job arrives. Jobs alternate between the
two workers so that machine noise hits both; the first two of each are warm-up. Bora jobs are tiny (4 frames,
32×32, 2 DDIM steps, the `tiny` model: BORA_MODEL_DIR if set, else built into a temp dir). Redis is
BORA_REDIS_URL or 127.0.0.1:6379 DB 13, under a throw-away key prefix deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from service.jobs import jobstore

REPO_ROOT = Path(__file__).resolve().parents[1]
BODY = {"prompt": "a beating heart, echocardiography", "num_frames": 4, "height": 32, "width": 32, "fps": 8,
        "num_inference_steps": 2, "sampler": "ddim", "seed": 1}
WARMUP = 2
TERMINAL = {"succeeded", "failed", "canceled"}

# The bare baseline: RQ's in-process worker on its own queue, blocking on Redis as worker/main.py's does.
BARE_WORKER = """
import sys
from redis import Redis
from rq import Queue, SimpleWorker
r = Redis.from_url(sys.argv[1], socket_timeout=None)
SimpleWorker([Queue(sys.argv[2], connection=r)], connection=r, name=sys.argv[3]).work(logging_level="WARNING")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def rq_finished(r: Redis, job_id: str) -> bool:
    """RQ's own bookkeeping after the function returned is done (the worker is back on the queue)."""
    return Job.fetch(job_id, connection=r).get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def alive(self, name: str) -> bool:
        if self.procs[name].poll() is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{tail}")
        return True

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def submit_bora(client: httpx.Client) -> str:
    response = client.post("/v1/videos", json=BODY)
    if response.status_code != 202:
        raise RuntimeError(f"{response.status_code}: {response.text}")
    return str(response.json()["id"])


def bora_pickup(r: Redis, prefix: str, job_id: str, procs: Processes) -> tuple[float, float, float, float]:
    """Wait for the job to end (record and RQ), then (total, API, RQ dequeue, job start) in seconds."""
    key = jobstore.Keys(prefix).job(job_id)
    wait_for(lambda: procs.alive("worker") and (r.hget(key, "status") or b"").decode() in TERMINAL, 60,
             f"job {job_id}")
    wait_for(lambda: rq_finished(r, job_id), 10, f"RQ to finish {job_id}")
    record = jobstore.get(r, job_id, prefix=prefix)
    assert record is not None and record.started_at is not None
    if record.status != "succeeded":
        raise RuntimeError(f"job {job_id} ended {record.status}: {record.error}")
    rq_job = Job.fetch(job_id, connection=r)
    assert rq_job.enqueued_at is not None and rq_job.started_at is not None
    enqueued, rq_started = aware(rq_job.enqueued_at), aware(rq_job.started_at)
    return (
        (record.started_at - record.created_at).total_seconds(),
        (enqueued - record.created_at).total_seconds(),
        (rq_started - enqueued).total_seconds(),
        (record.started_at - rq_started).total_seconds(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40, help="measured jobs per worker (after 2 warm-up)")
    parser.add_argument("--gap", type=float, default=0.25, help="idle seconds before each submission")
    parser.add_argument("--redis-url", default=os.environ.get("BORA_REDIS_URL", "redis://127.0.0.1:6379/13"))
    args = parser.parse_args()

    prefix = "bora-bench-" + secrets.token_hex(4)
    tmp = Path(tempfile.mkdtemp(prefix=prefix + "-"))
    model_dir = os.environ.get("BORA_MODEL_DIR")
    if not model_dir:
        import diffusers
        import transformers

        from model.presets import make_tiny

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        model_dir = str(make_tiny(tmp / "models" / "tiny"))
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env.update(
        BORA_REDIS_URL=args.redis_url, BORA_KEY_PREFIX=prefix, BORA_DATA_DIR=str(tmp / "data"),
        BORA_MODEL_PRESET="tiny", BORA_MODEL_DIR=model_dir, BORA_DEVICE="cpu",
        BORA_AUTH="disabled", BORA_HOST="127.0.0.1", BORA_WORKER_METRICS_PORT="0",
        BORA_WORKER_ID=f"{prefix}-worker", BORA_RETENTION_SECONDS="600", PYTHONPATH=str(REPO_ROOT),
    )
    r = Redis.from_url(args.redis_url)
    bare_queue_name = f"{prefix}-noop"
    bare_queue = Queue(bare_queue_name, connection=r)
    procs = Processes(env, tmp)
    bora: list[tuple[float, float, float, float]] = []  # total, API, RQ dequeue, job start
    bare: list[float] = []
    bora_ids: list[str] = []
    bare_ids: list[str] = []
    try:
        procs.spawn("api", "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(api_port),
                    "--log-level", "warning", "--no-access-log")
        procs.spawn("worker", "-m", "worker.main", "--log-level", "WARNING")
        procs.spawn("bare", "-c", BARE_WORKER, args.redis_url, bare_queue_name, f"{prefix}-noop-worker")
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)

        def api_up() -> bool:
            try:
                return procs.alive("api") and client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(api_up, 60, "the API", 0.1)
        wait_for(lambda: procs.alive("worker") and client.get("/readyz").status_code == 200, 120,
                 "the worker to load the model", 0.1)

        for i in range(WARMUP + args.jobs):
            bora_ids.append(submit_bora(client))
            sample = bora_pickup(r, prefix, bora_ids[-1], procs)
            time.sleep(args.gap)
            bare_ids.append(bare_queue.enqueue_call("os.getpid", result_ttl=600).id)
            wait_for(lambda: procs.alive("bare") and rq_finished(r, bare_ids[-1]), 10, "the no-op", 0.005)
            noop = Job.fetch(bare_ids[-1], connection=r)
            assert noop.enqueued_at is not None and noop.started_at is not None
            if i >= WARMUP:
                bora.append(sample)
                bare.append((aware(noop.started_at) - aware(noop.enqueued_at)).total_seconds())
            time.sleep(args.gap)
    finally:
        procs.stop()
        keys = set(r.scan_iter(match=f"*{prefix}*", count=1000))
        for job_id in bora_ids + bare_ids:  # rq:job:<id>, rq:results:<id>
            keys.update(r.scan_iter(match=f"*{job_id}*", count=1000))
        if keys:
            r.delete(*keys)
        r.srem("rq:workers", f"{prefix}-worker", f"{prefix}-noop-worker")
        r.srem("rq:queues", f"rq:queue:{prefix}-videos", f"rq:queue:{bare_queue_name}")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when something failed: the process logs are there

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1e3

    totals = [b[0] for b in bora]
    print(f"idle worker pickup on loopback: {args.jobs} jobs each (after {WARMUP} warm-up), alternating, "
          f"{args.gap:g} s idle before each, {os.cpu_count()} CPUs; Bora job = 4×32×32, 2 steps, tiny model")
    print(f"{'worker':<34} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    print(f"{'bora (created_at → started_at)':<34} {ms(totals, 0.5):8.2f} {ms(totals, 0.99):8.2f} "
          f"{statistics.mean(totals) * 1e3:8.2f}")
    print(f"{'bare RQ no-op (enqueued → started)':<34} {ms(bare, 0.5):8.2f} {ms(bare, 0.99):8.2f} "
          f"{statistics.mean(bare) * 1e3:8.2f}")
    for label, index in (("  bora: API created → RQ enqueued", 1), ("  bora: RQ dequeue (enq → started)", 2),
                         ("  bora: job start (RQ → running)", 3)):
        part = [b[index] for b in bora]
        print(f"{label:<34} {ms(part, 0.5):8.2f} {ms(part, 0.99):8.2f} {statistics.mean(part) * 1e3:8.2f}")
    print(f"pickup ratio bora/bare: p50 = {percentile(totals, 0.5) / percentile(bare, 0.5):.2f}; "
          f"p99 = {percentile(totals, 0.99) / percentile(bare, 0.99):.2f}")


if __name__ == "__main__":
    main()
