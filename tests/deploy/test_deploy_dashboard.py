"""The provisioned Grafana dashboard: wired to the provisioned datasource, and it has the panels operators need.

Whether every query returns data is checked against a live Prometheus in test_deploy_live.py.
"""

from __future__ import annotations

import re

import yaml
from deploy_files import COMPOSE_FILE, GRAFANA_PROVISIONING, panels

REQUIRED_STAGES = ("queue_wait", "denoising", "decoding", "encoding_video", "uploading")


def _datasource_uid() -> str:
    provisioned = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    return datasource["uid"]


def test_the_dashboard_provider_reads_the_folder_compose_mounts():
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "bora.yml").read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_every_panel_uses_the_provisioned_datasource(dashboard):
    uid = _datasource_uid()
    ids = []
    for panel in panels(dashboard):
        ids.append(panel["id"])
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "bora-overview"


def test_the_required_panels_are_there(dashboard_queries):
    exprs = [expr for _title, expr in dashboard_queries]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    assert has(r"^max\(bora_queue_depth\)$"), "queue depth"
    # Jobs by outcome come from the API's Redis counters (every terminal path), not from the workers'.
    assert has(r"sum by \(status\) \(.*rate\(bora_jobs_finished_total\[.*\* 60$"), "jobs per minute by status"
    for quantile in ("0.5", "0.95"):
        assert has(rf"histogram_quantile\({quantile}, sum by \(le, stage\) \(rate\(bora_worker_stage_duration"), quantile
    assert has(r"sum by \(instance\) \(rate\(bora_worker_denoising_steps_total\["), "denoising steps/s per worker"
    assert has(r"avg_over_time\(bora_worker_busy\["), "worker busy ratio"
    assert has(r"bora_worker_gpu_memory_bytes"), "GPU memory"
    assert has(r"sum by \(route\) \(rate\(bora_http_requests_total\["), "API request rate"
    assert has(r'code=~"5\.\.".*/ sum\(rate\(bora_http_requests_total'), "API error ratio"
    assert has(r'by \(code\) \(.*bora_jobs_finished_total\{status="failed"\}'), "failures by code"
    assert not has(r"bora_worker_jobs_total"), "worker counters miss worker_lost and API cancels"


def test_stage_panels_do_not_filter_out_a_required_stage(dashboard_queries):
    for _title, expr in dashboard_queries:
        match = re.search(r'bora_worker_stage_duration_seconds_bucket\{stage!="(\w+)"\}', expr)
        if match:
            assert match.group(1) not in REQUIRED_STAGES
