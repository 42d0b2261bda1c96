"""Container lifecycle settings that must agree with the processes inside: Docker's SIGKILL comes after each
process's own drain or grace period, a worker is healthy only once its model is loaded, and Redis fsyncs every
write so a job the API answered 202 for survives a host crash."""

from __future__ import annotations

import re

from deploy_files import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"


def seconds(duration: str) -> float:
    """A compose duration (`30s`, `6m`, `1m30s`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def default(value: str) -> str:
    """`${VAR:-default}` -> default; a literal stays itself."""
    match = re.fullmatch(r"\$\{\w+:-(?P<default>[^}]*)\}", value)
    return match.group("default") if match else value


def test_api_is_killed_only_after_uvicorn_has_drained(compose):
    dockerfile = (DOCKER_DIR / "Dockerfile.api").read_text()
    drain = re.search(r"--timeout-graceful-shutdown (\d+)", dockerfile)
    assert drain, "uvicorn needs a bounded drain (--timeout-graceful-shutdown)"
    period = seconds(default(compose["services"]["api"]["stop_grace_period"]))
    assert period >= int(drain.group(1)) + 5, f"stop_grace_period {period} s leaves uvicorn no time to drain"


def test_worker_is_killed_only_after_its_grace_period(compose):
    worker = compose["services"]["worker"]
    grace = float(default(worker["command"][worker["command"].index("--grace") + 1]))
    assert seconds(default(worker["stop_grace_period"])) >= grace + 30


def test_worker_health_is_the_loaded_model_not_the_metrics_port(compose):
    for name in ("worker", "worker-cpu"):
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert "http://127.0.0.1:9100/healthz" in test, name
    dockerfile = (DOCKER_DIR / "Dockerfile.worker").read_text()
    checks = re.findall(r"HEALTHCHECK .*\n\s+CMD (.*)", dockerfile)
    assert len(checks) == 2 and all("/healthz" in check for check in checks), checks


def test_redis_fsyncs_every_write(compose):
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command


def test_text_encoder_placement_reaches_the_gpu_worker(compose, env_example):
    env = compose["services"]["worker"]["environment"]
    assert default(env["BORA_TEXT_ENCODER_DEVICE"]) == env_example["BORA_TEXT_ENCODER_DEVICE"] == "same"
    assert default(env["BORA_TEXT_ENCODER_DTYPE"]) == env_example["BORA_TEXT_ENCODER_DTYPE"] == "float32"
