"""Fixtures for the deployment tests: the repo's deploy files parsed once, and the PromQL they contain."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from deploy_files import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    ENV_EXAMPLE,
    PROMETHEUS_DIR,
    alert_probe,
    panels,
    substitute_grafana_macros,
)


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


@pytest.fixture(scope="session")
def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]


@pytest.fixture(scope="session")
def dashboard_queries(dashboard) -> list[tuple[str, str]]:
    """(panel title, expr as Grafana sends it) for every target of every panel and templating query."""
    queries = [
        (panel.get("title", "?"), substitute_grafana_macros(target["expr"]))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            queries.append((f"variable {variable['name']}", substitute_grafana_macros(query)))
    return queries


@pytest.fixture(scope="session")
def rule_queries(rule_groups) -> list[tuple[str, str]]:
    """(rule name, expr to evaluate): recording rules as written, alerts reduced to their probe."""
    queries = []
    for group in rule_groups:
        for rule in group["rules"]:
            if "record" in rule:
                queries.append((rule["record"], " ".join(rule["expr"].split())))
            else:
                queries.append((rule["alert"], alert_probe(rule["expr"])))
    return queries
