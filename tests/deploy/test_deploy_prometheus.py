"""Prometheus config and alert rules: promtool accepts them, and the alert unit tests pass."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from deploy_files import PROMETHEUS_DIR, alert_probe, require_binary

REQUIRED_ALERTS = {
    "BoraQueueBackingUp",  # queue backing up
    "BoraNoReadyWorker",  # no ready worker
    "BoraHighErrorRatio",  # high error ratio
    "BoraJobLatencyOverObjective",  # job latency over its objective
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", "prometheus")
    return subprocess.run([binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts.test.yml")],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_api_and_worker_replica_is_discovered_by_dns():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["bora-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9100, "refresh_interval": "15s"}
    ]
    assert jobs["bora-api"]["dns_sd_configs"][0]["names"] == ["api"]
    assert jobs["bora-api"]["dns_sd_configs"][0]["port"] == 8000
    assert config["rule_files"] == ["alerts.yml"]


def test_required_alerts_exist_with_severity_and_summary(rule_groups):
    alerts = {rule["alert"]: rule for group in rule_groups for rule in group["rules"] if "alert" in rule}
    assert REQUIRED_ALERTS <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        alert_probe(rule["expr"])  # every alert stays in a shape the live test can probe
