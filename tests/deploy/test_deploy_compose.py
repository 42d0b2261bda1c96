"""docker-compose.yml: validated by Debian's docker-compose (v1, no engine needed), then checked structurally."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_files import COMPOSE_FILE, REPO_ROOT, compose_env, require_binary

SECRETS = (
    "REDIS_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "BORA_S3_ACCESS_KEY_ID",
    "BORA_S3_SECRET_ACCESS_KEY",
    "GRAFANA_ADMIN_PASSWORD",
    "BORA_WEBHOOK_SECRET",
)
CORE_SERVICES = {"redis", "minio", "minio-setup", "api", "webhooks", "worker", "prometheus", "grafana"}
LONG_RUNNING = {"redis", "minio", "api", "webhooks", "worker", "worker-cpu", "prometheus", "grafana"}
_REFERENCE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?P<op>:\?|\?|:-|-)?(?P<arg>[^}]*)\}")
_SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER|REDISCLI_AUTH")


def run_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = require_binary("docker-compose", "docker-compose")
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_validates(profile):
    result = run_compose("config", "-q", env=compose_env(COMPOSE_PROFILES=profile))
    assert result.returncode == 0, result.stderr


def test_profiles_select_the_worker_flavour(compose):
    # (docker-compose v1's `config --services` ignores profiles, so this reads the file.)
    profiles = {name: service.get("profiles") for name, service in compose["services"].items()}
    assert profiles == {
        **{name: None for name in CORE_SERVICES - {"worker"}},
        "worker": ["gpu"], "worker-cpu": ["cpu"], "model-tiny": ["cpu"],
    }


@pytest.mark.parametrize("secret", SECRETS)
def test_every_secret_is_required(secret):
    env = compose_env()
    del env[secret]
    result = run_compose("config", "-q", env=env)
    assert result.returncode != 0, f"compose starts without {secret}"
    assert secret in result.stderr


def test_resolved_config_carries_the_secrets_from_the_environment():
    result = run_compose("config", env=compose_env(COMPOSE_PROFILES="gpu", REDIS_PASSWORD="r3d1s"))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    for name in ("api", "worker"):
        assert config["services"][name]["environment"]["BORA_REDIS_URL"] == "redis://:r3d1s@redis:6379/0"
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-grafana-password"


def test_services_and_healthchecks(compose):
    services = compose["services"]
    assert CORE_SERVICES | {"worker-cpu", "model-tiny"} == set(services)
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: container_name breaks --scale and parallel stacks"
        for image in [service.get("image", "")]:
            assert image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"


def test_redis_keeps_an_append_only_file_on_a_volume(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert "redis-data:/data" in redis["volumes"]


def test_minio_setup_runs_once_after_minio_is_healthy(compose):
    setup = compose["services"]["minio-setup"]
    assert setup["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert setup["restart"] == "no"
    assert "./deploy/minio:/setup:ro" in setup["volumes"]
    assert (REPO_ROOT / "deploy" / "minio" / "setup-bucket.sh").is_file()


@pytest.mark.parametrize("name", ["api", "worker", "worker-cpu"])
def test_bora_services_wait_for_healthy_dependencies(compose, name):
    depends = compose["services"][name]["depends_on"]
    assert depends["redis"] == {"condition": "service_healthy"}
    assert depends["minio-setup"] == {"condition": "service_completed_successfully"}


def test_worker_reserves_gpus_and_scales(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "${BORA_GPUS_PER_WORKER:-1}", "capabilities": ["gpu"]}]
    assert "ports" not in worker, "a published port would stop `--scale worker=N`"
    assert worker["profiles"] == ["gpu"]
    assert worker["build"]["target"] == "cuda"
    assert worker["environment"]["BORA_MODEL_DIR"] == "/models/bora"
    assert "${BORA_MODEL_HOST_DIR:-./models/bora}:/models/bora:ro" in worker["volumes"]
    assert "9100" in worker["expose"]


def test_cpu_worker_runs_the_tiny_model_under_the_worker_dns_name(compose):
    cpu = compose["services"]["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and "ports" not in cpu
    assert cpu["environment"]["BORA_MODEL_PRESET"] == "tiny" and cpu["environment"]["BORA_DEVICE"] == "cpu"
    assert cpu["networks"]["default"]["aliases"] == ["worker"]
    assert cpu["depends_on"]["model-tiny"] == {"condition": "service_completed_successfully"}
    assert "models-tiny:/models/tiny:ro" in cpu["volumes"]
    assert compose["services"]["model-tiny"]["build"]["target"] == "cpu"


def test_data_lives_on_named_volumes(compose):
    assert {"redis-data", "minio-data", "prometheus-data", "grafana-data", "models-tiny"} <= set(compose["volumes"])
    assert "prometheus-data:/prometheus" in compose["services"]["prometheus"]["volumes"]
    assert "grafana-data:/var/lib/grafana" in compose["services"]["grafana"]["volumes"]
    assert "minio-data:/data" in compose["services"]["minio"]["volumes"]


def test_bind_mounts_point_at_files_in_the_repo(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and "${" not in volume.split(":")[0]:
                assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist"


def test_grafana_has_no_default_password_and_no_anonymous_access(compose):
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_no_secret_is_hard_coded(compose):
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _SECRETISH.search(key):
                match = _REFERENCE.fullmatch(str(value))
                assert match and match.group("op") == ":?", f"{name}.{key} must be ${{VAR:?...}}, got {value!r}"
        url = (service.get("environment") or {}).get("BORA_REDIS_URL")
        if url:
            assert "${REDIS_PASSWORD:?" in url


def test_every_published_port_comes_from_the_environment(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host_address, host_port, container_port = re.split(r":(?![^{]*\})", port)
            assert host_address == "${BORA_BIND_ADDRESS:-127.0.0.1}", f"{name}: {port}"
            assert _REFERENCE.fullmatch(host_port), f"{name}: host port of {port} is not a variable"
            assert container_port.isdigit()


def test_env_example_lists_every_variable_with_the_same_default(env_example):
    text = COMPOSE_FILE.read_text()
    references = {m.group("name"): m for m in _REFERENCE.finditer(text)}
    missing = sorted(set(references) - set(env_example))
    assert not missing, f".env.example lacks {missing}"
    for name, match in references.items():
        if match.group("op") in (":?", "?"):
            assert env_example[name] == "", f".env.example must leave the secret {name} empty"
        elif match.group("op") in (":-", "-"):
            assert env_example[name] == match.group("arg"), (
                f"{name}: .env.example says {env_example[name]!r}, compose defaults to {match.group('arg')!r}"
            )
    assert env_example["COMPOSE_PROFILES"] == "gpu"


def _fake_mc(tmp_path: Path) -> Path:
    """An `mc` that logs its arguments and answers `admin user info` with the attached policy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mc = bin_dir / "mc"
    mc.write_text(
        '#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
        'case "$*" in "admin user info"*) echo "PolicyName: bora-videos-rw";; esac\n'
    )
    mc.chmod(mc.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize(("retention_seconds", "days", "name"), [
    (604800, 7, "BORA_RETENTION_SECONDS"), (90000, 2, "BORA_RETENTION_SECONDS"), (60, 1, "BORA_RETENTION_SECONDS"),
    (90000, 2, "BORA_JOB_RETENTION_SECONDS"),  # the old name still works
])
def test_minio_setup_expires_objects_after_the_retention(tmp_path, retention_seconds, days, name):
    bin_dir = _fake_mc(tmp_path)
    log = tmp_path / "mc.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "MC_LOG": str(log), "MINIO_URL": "http://minio:9000",
        "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpass", "BORA_S3_BUCKET": "bora-videos",
        "BORA_S3_ACCESS_KEY_ID": "bora", "BORA_S3_SECRET_ACCESS_KEY": "borasecret",
        name: str(retention_seconds),
    }
    script = REPO_ROOT / "deploy" / "minio" / "setup-bucket.sh"
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert "mb --ignore-existing bora/bora-videos" in calls
    assert f"ilm rule add --expire-days {days} bora/bora-videos" in calls
    assert "admin user add bora bora borasecret" in calls
    assert f"expiry={days}d" in result.stdout
