"""Every PromQL expression of the dashboard and of the alert rules returns data from a real Prometheus.

Real processes, as in production but on loopback: the API (`uvicorn service.main:app`), one worker
(`python -m worker.main`, tiny model on CPU) and Redis (CI's, on a DB index and key prefix of our own), and
Debian's Prometheus scraping both every second with deploy/prometheus/alerts.yml loaded (the production
prometheus.yml with its DNS discovery swapped for the two loopback targets). We run three jobs that succeed
and one whose storage fails (a file squats on its output folder), then evaluate:

- every dashboard target, with Grafana's macros replaced by concrete windows (conftest.GRAFANA_MACROS);
- every recording rule as written;
- every alert's probe: the value it compares with a threshold (`x > 10` -> `x`) or checks with
  `absent(x)` -> `x` — conditions are empty while all is well, their values must not be.

Each must return a non-empty result; the stage-latency panels must give a finite p50/p95 for every stage the
issue names, and Prometheus must report every rule healthy (no evaluation error).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import redis
import yaml
from deploy_files import PROMETHEUS_DIR, require_binary

from tests.support import free_port, stack_env, start_process, stop_processes

REDIS_DB = 13  # tests/deploy's own DB index on the machine's Redis (keys are also prefixed per run)
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
REQUIRED_STAGES = {"queue_wait", "denoising", "decoding", "encoding_video", "uploading"}
JOB_BODY = {"prompt": "A beating human heart, cross-section, ultrasound style", "num_frames": 8,
            "num_inference_steps": 3}
TERMINAL = {"succeeded", "failed", "canceled"}

pytestmark = pytest.mark.timeout(300)


def wait_for(what: str, check, timeout: float, procs: dict[str, subprocess.Popen], logs: Path) -> Any:
    """Poll `check()` until it returns something truthy; fail early, with logs, if a process died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}\n{tails(logs)}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})\n{tails(logs)}")


def tails(logs: Path, lines: int = 25) -> str:
    out = []
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.name} (last {lines} lines)\n" + "\n".join(text))
    return "\n".join(out)


def prometheus_config(api_port: int, worker_port: int) -> dict[str, Any]:
    """The production config with 1 s intervals and the DNS discovery replaced by the loopback targets."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    ports = {"bora-api": api_port, "bora-worker": worker_port}
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in ports]
    assert len(jobs) == 2, "prometheus.yml must define the bora-api and bora-worker jobs"
    for job in jobs:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config["scrape_configs"] = jobs
    return config


@pytest.fixture
def stack(tmp_path, tiny_model_dir) -> Iterator[dict[str, Any]]:
    """API + worker + Prometheus on free loopback ports; torn down (and our Redis keys deleted) afterwards."""
    prometheus_bin = require_binary("prometheus", "prometheus")
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        r.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({exc}); .ci/run starts it")

    prefix = f"deploytest-{uuid.uuid4().hex[:10]}"
    api_port, worker_port, prom_port = free_port(), free_port(), free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    storage_dir = tmp_path / "videos"
    env = stack_env(
        REDIS_URL, prefix, tmp_path / "data", tiny_model_dir, api_port,
        BORA_STORAGE="local", BORA_STORAGE_DIR=str(storage_dir), BORA_WORKER_METRICS_PORT=str(worker_port),
        BORA_HEARTBEAT_INTERVAL_SECONDS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
    )
    prom_dir = tmp_path / "prometheus"
    (prom_dir / "data").mkdir(parents=True)
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(api_port, worker_port)))

    commands = {
        "api": [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(api_port)],
        "worker": [sys.executable, "-m", "worker.main", "--grace", "5"],
        "prometheus": [prometheus_bin, f"--config.file={prom_dir / 'prometheus.yml'}",
                       f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                       "--log.level=warn"],
    }
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            procs[name] = start_process(command, env, logs / f"{name}.log")
        yield {
            "api": httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10),
            "prometheus": httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10),
            "storage_dir": storage_dir, "procs": procs, "logs": logs,
        }
    finally:
        stop_processes(procs.values())
        keys = list(r.scan_iter(match=f"*{prefix}*", count=500))
        if keys:
            r.delete(*keys)
        r.close()
        shutil.rmtree(prom_dir, ignore_errors=True)


def query(prom: httpx.Client, expr: str) -> list[dict[str, Any]]:
    response = prom.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error', body)}"
    return body["data"]["result"]


def value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_every_dashboard_and_alert_query_returns_data(stack, dashboard_queries, rule_queries):
    api, prom, procs, logs = stack["api"], stack["prometheus"], stack["procs"], stack["logs"]

    def up(job: str) -> bool:
        return any(value(s) == 1 for s in query(prom, f'up{{job="{job}"}}'))

    wait_for("a ready worker", lambda: api.get("/readyz").status_code == 200, 180, procs, logs)
    wait_for("Prometheus scraping the API and the worker",
             lambda: prom.get("/-/ready").status_code == 200 and up("bora-api") and up("bora-worker"),
             60, procs, logs)

    def submit(seed: int) -> str:
        response = api.post("/v1/videos", json={**JOB_BODY, "seed": seed})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def finished(job_id: str) -> dict[str, Any] | None:
        job = api.get(f"/v1/videos/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    # One job first and a scrape of its results, so the later jobs *increase* every histogram bucket and
    # rate() sees it (a series first scraped at its final value has rate 0 and a NaN quantile).
    first = submit(1)
    assert wait_for(f"job {first}", lambda: finished(first), 120, procs, logs)["status"] == "succeeded"
    wait_for("the first job in Prometheus",
             lambda: query(prom, 'bora_worker_stage_duration_seconds_count{stage="uploading"}'), 30, procs, logs)
    good = [submit(seed) for seed in (2, 3)]
    doomed = submit(4)
    # Its output folder is taken by a file: every upload attempt fails -> job failed, code storage_error.
    squat = stack["storage_dir"] / PurePosixPath(f"videos/{doomed}")
    squat.parent.mkdir(parents=True, exist_ok=True)
    squat.write_text("not a folder")
    assert api.get("/v1/videos/vid_does_not_exist").status_code == 404  # some 4xx for the error panels

    for job_id in good:
        assert wait_for(f"job {job_id}", lambda j=job_id: finished(j), 120, procs, logs)["status"] == "succeeded"
    failed = wait_for(f"job {doomed}", lambda: finished(doomed), 120, procs, logs)
    assert failed["status"] == "failed" and failed["error"]["code"] == "storage_error", failed

    # Prometheus has scraped the final counts and evaluated the rules on them.
    wait_for("all four jobs in Prometheus",
             lambda: (s := query(prom, "max(sum by (instance) (bora_jobs_finished_total))")) and value(s[0]) >= 4,
             30, procs, logs)
    wait_for("the recording rules", lambda: query(prom, "bora:job_failure_ratio:rate15m"), 30, procs, logs)
    time.sleep(2)  # two more scrapes and rule evaluations after the last job

    empty = []
    for source, queries in (("dashboard", dashboard_queries), ("rules", rule_queries)):
        for name, expr in queries:
            if "$" in expr:
                empty.append(f"{source} / {name}: unresolved template variable in {expr}")
            elif not query(prom, expr):
                empty.append(f"{source} / {name}: no data for {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)

    stage_exprs = [expr for _name, expr in dashboard_queries
                   if "sum by (le, stage)" in expr and "bora_worker_stage_duration_seconds_bucket" in expr]
    assert len(stage_exprs) == 2, stage_exprs  # p50 and p95
    for expr in stage_exprs:
        finite = {s["metric"]["stage"] for s in query(prom, expr) if math.isfinite(value(s))}
        assert REQUIRED_STAGES <= finite, f"no finite value for {REQUIRED_STAGES - finite} in {expr}"

    failures = query(prom, 'sum by (code) (bora_worker_jobs_total{status="failed"})')
    assert {s["metric"]["code"]: value(s) for s in failures} == {"storage_error": 1.0}

    rules = prom.get("/api/v1/rules").json()["data"]["groups"]
    unhealthy = [(rule["name"], rule.get("lastError")) for group in rules for rule in group["rules"]
                 if rule["health"] != "ok"]
    assert not unhealthy, unhealthy
    assert sum(len(group["rules"]) for group in rules) == len(rule_queries)
