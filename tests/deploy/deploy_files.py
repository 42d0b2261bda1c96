"""What the deployment tests share: where the deploy files are, and how PromQL is read out of them.

(A module of its own, not conftest.py: several conftest modules exist under tests/, so importing names
from "conftest" would be ambiguous.)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD_FILE = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "bora.json"
GRAFANA_PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning"

# What Grafana substitutes before it sends a query; the live test uses these concrete values.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
_COMPARISON = re.compile(r"^(?P<lhs>.+?)\s*(?:==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$", re.S)
_ABSENT = re.compile(r"^absent\((?P<inner>.+)\)$", re.S)


def require_binary(name: str, package: str) -> str:
    """The path of a tool CI installs (.ci/run); a missing one is a broken machine, not a skip."""
    path = shutil.which(name)
    assert path, f"`{name}` not found: install Debian's `{package}` (apt-get install --no-install-recommends {package})"
    return path


def compose_env(**overrides: str) -> dict[str, str]:
    """A minimal environment for `docker-compose config`: PATH plus dummy values for every required secret."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(
        REDIS_PASSWORD="test-redis-password",
        MINIO_ROOT_USER="test-minio-root",
        MINIO_ROOT_PASSWORD="test-minio-root-password",
        BORA_S3_ACCESS_KEY_ID="test-bora-key",
        BORA_S3_SECRET_ACCESS_KEY="test-bora-secret",
        GRAFANA_ADMIN_PASSWORD="test-grafana-password",
        BORA_WEBHOOK_SECRET="test-webhook-master-secret",
    )
    env.update(overrides)
    return env


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panels(panel))
    return found


def substitute_grafana_macros(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def alert_probe(expr: str) -> str:
    """The part of an alert condition that must return data while the system is healthy.

    Conditions are naturally empty when nothing is wrong, so each alert is written as `<value> <cmp> <number>`
    (the value usually a recording rule) or `absent(<value>)`; the probe is `<value>`. An alert in any other
    shape fails the test: keep alerts in these two shapes so every one stays checkable.
    """
    expr = " ".join(expr.split())
    absent = _ABSENT.match(expr)
    if absent:
        return absent.group("inner")
    comparison = _COMPARISON.match(expr)
    assert comparison, f"alert expression is not '<value> <cmp> <number>' or 'absent(<value>)': {expr}"
    return comparison.group("lhs")
