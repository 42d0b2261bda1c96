"""deploy/k8s: both overlays (and the plain-HPA variant) render offline, validate against the Kubernetes
schemas (KEDA's resources against KEDA's own CRD schema), pass a checkov scan with every skip explained,
and agree with the code and docker-compose.yml on env var names, commands, ports, probes and grace periods."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_files import REPO_ROOT
from fastapi.testclient import TestClient
from k8s_manifests import KEDA_SCHEMAS, OVERLAYS, container, containers, find, hpa_variant, render, workloads
from pydantic import AliasChoices

from service.jobs.config import Settings
from service.jobs.jobstore import queue_name
from tests.support import free_port
from worker.metrics import WorkerMetrics

# checkov pins old boto3/networkx/packaging, so it lives in a venv of its own (Makefile: $(CHECKOV)).
CHECKOV = REPO_ROOT / "build" / "tools" / "checkov" / "bin" / "checkov"
KUBERNETES_VERSION = "1.32.0"  # the oldest minor we support; kubernetes-validate bundles its schemas
VARIANTS = ("gpu", "cpu", "gpu-hpa")
_SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|REDISCLI_AUTH")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    rendered = {name: render(path) for name, path in OVERLAYS.items()}
    rendered["gpu-hpa"] = render(hpa_variant(tmp_path_factory.mktemp("gpu-hpa")))
    return rendered


@pytest.fixture(scope="module")
def gpu(manifests) -> list[dict[str, Any]]:
    return manifests["gpu"]


def compose_default(value: str) -> str:
    """`${VAR:-default}` -> default, inside a longer string too."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from the vendored KEDA CRDs."""
    schemas = {}
    for path in KEDA_SCHEMAS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate(doc: dict[str, Any]) -> None:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# ---- schemas and security scan ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_match_their_schemas(manifests, variant):
    docs = manifests[variant]
    assert len(docs) > 15
    for doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_schema_validation_catches_mistakes(gpu):
    """The validators are not vacuous: a wrong type or an unknown field in each kind of document fails."""
    deployment = copy.deepcopy(find(gpu, "Deployment", "worker"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 360  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(find(gpu, "ScaledObject", "worker"))
    scaled["spec"]["minReplicaCount"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    auth = copy.deepcopy(find(gpu, "TriggerAuthentication", "bora-redis"))
    del auth["spec"]["secretTargetRef"][0]["key"]
    with pytest.raises(jsonschema.ValidationError):
        validate(auth)


def test_checkov_finds_nothing_unexplained(manifests, tmp_path):
    """checkov's Kubernetes checks over every variant: none fails, and each one skipped carries its reason
    in the manifest (`checkov.io/skipN: CHECK=reason` annotations)."""
    for variant, docs in manifests.items():
        (tmp_path / f"{variant}.yaml").write_text(yaml.safe_dump_all(docs))
    assert CHECKOV.exists(), f"{CHECKOV} missing: `make test` installs checkov in its own venv"
    result = subprocess.run(
        [str(CHECKOV), "--compact", "--framework", "kubernetes", "--output", "json", "--skip-download",
         "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    results = json.loads(result.stdout)["results"]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in results["failed_checks"]]
    assert not failed, "checkov findings:\n" + "\n".join(failed)
    assert len(results["passed_checks"]) > 100, "checkov ran almost no check"
    for check in results["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 30, f"{check['check_id']} on {check['resource']} skipped without a reason"


# ---- what the issue asks of each part ---------------------------------------------------------------------


def test_every_pod_is_non_root_read_only_and_bounded(manifests):
    for variant, docs in manifests.items():
        for doc in workloads(docs):
            pod = doc["spec"]["template"]["spec"]
            where = f"{variant} {doc['kind']}/{doc['metadata']['name']}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["automountServiceAccountToken"] is False, where
            for c in containers(doc):
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
                resources = c["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), where


def test_api_has_replicas_autoscaling_a_disruption_budget_and_probes(gpu):
    api = find(gpu, "Deployment", "api")
    assert api["spec"]["replicas"] >= 2
    hpa = find(gpu, "HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["scaleTargetRef"]["name"] == "api"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = find(gpu, "PodDisruptionBudget", "api")
    assert pdb["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]
    main = container(api, "api")
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    readiness = main["readinessProbe"]["exec"]["command"]
    assert readiness[-1] == f"http://127.0.0.1:{port_of(main, 'http')}/readyz", readiness


def test_worker_takes_one_gpu_on_gpu_nodes_and_a_read_only_model_volume(gpu):
    worker = find(gpu, "Deployment", "worker")
    pod = worker["spec"]["template"]["spec"]
    main = container(worker, "worker")
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    (models,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    claim = find(gpu, "PersistentVolumeClaim", models["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == models["name"]]
    assert mount["readOnly"] is True and mount["mountPath"] == env_of(main)["BORA_MODEL_DIR"]
    assert "replicas" not in worker["spec"], "the autoscaler owns the worker count"


def test_keda_scales_workers_on_the_queue_the_api_fills(gpu):
    scaled = find(gpu, "ScaledObject", "worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "worker"
    assert spec["minReplicaCount"] == 0 and 1 <= spec["maxReplicaCount"] <= 16
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    prefix = find(gpu, "ConfigMap", "bora-config")["data"]["BORA_KEY_PREFIX"]
    assert trigger["metadata"]["listName"] == f"rq:queue:{queue_name(prefix)}"  # RQ's list for our queue
    namespace = find(gpu, "Service", "redis")["metadata"]["namespace"]
    assert trigger["metadata"]["address"] == f"redis.{namespace}.svc.cluster.local:6379"
    auth = find(gpu, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    assert (ref["name"], ref["key"]) in secret_refs(find(gpu, "Deployment", "worker"))["REDIS_PASSWORD"]
    assert spec["cooldownPeriod"] >= grace_seconds(find(gpu, "Deployment", "worker"))


def test_plain_hpa_variant_scales_on_the_exported_queue_depth(manifests):
    docs = manifests["gpu-hpa"]
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    hpa = find(docs, "HorizontalPodAutoscaler", "worker")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "bora_queue_depth"
    metrics_source = (REPO_ROOT / "service" / "api" / "metrics.py").read_text()
    assert '"bora_queue_depth"' in metrics_source, "the API no longer exports bora_queue_depth"


def test_network_policies_open_only_the_api_to_the_outside(gpu):
    policies = {d["metadata"]["name"]: d["spec"] for d in gpu if d["kind"] == "NetworkPolicy"}
    assert any(p["podSelector"] == {} and p.get("ingress") is None for p in policies.values()), "default deny"
    open_to_all = [name for name, p in policies.items() for rule in p.get("ingress", []) if "from" not in rule]
    assert open_to_all == ["api-from-anywhere"]
    api_labels = find(gpu, "Deployment", "api")["spec"]["template"]["metadata"]["labels"]
    assert policies["api-from-anywhere"]["podSelector"]["matchLabels"].items() <= api_labels.items()
    (redis_rule,) = policies["redis-from-bora-pods"]["ingress"]
    pods, keda = redis_rule["from"]
    components = [e for e in pods["podSelector"]["matchExpressions"] if e["key"] == "app.kubernetes.io/component"]
    assert sorted(components[0]["values"]) == ["api", "webhooks", "worker"]
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert policies["redis-from-bora-pods"]["egress"] == []


def test_secrets_are_referenced_never_inlined(manifests):
    for variant, docs in manifests.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{variant}: a Secret object holds values"
        for key in find(docs, "ConfigMap", "bora-config")["data"]:
            assert not _SECRETISH.search(key), f"{key} is in a ConfigMap"
        for doc in workloads(docs):
            for c in containers(doc):
                for var in c.get("env", []):
                    if _SECRETISH.search(var["name"]):
                        assert "secretKeyRef" in var.get("valueFrom", {}), f"{variant} {c['name']}: {var['name']}"
                    if "value" in var and "redis://" in var["value"]:
                        assert "$(REDIS_PASSWORD)" in var["value"], var


def test_grafana_dashboard_and_alert_rules_ship_as_config_maps(gpu):
    dashboard = find(gpu, "ConfigMap", "bora-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["bora.json"])
    assert shipped == json.loads((REPO_ROOT / "deploy/grafana/dashboards/bora.json").read_text())
    rules = find(gpu, "ConfigMap", "bora-prometheus-rules")
    assert rules["data"]["alerts.yml"] == (REPO_ROOT / "deploy/prometheus/alerts.yml").read_text()


# ---- in step with the code and docker-compose.yml ----------------------------------------------------------


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var.get("value", "") for var in c.get("env", [])}


def secret_refs(doc: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    refs: dict[str, set[tuple[str, str]]] = {}
    for c in containers(doc):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.setdefault(var["name"], set()).add((ref["name"], ref["key"]))
    return refs


def port_of(c: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


def grace_seconds(worker: dict[str, Any]) -> float:
    command = container(worker, "worker")["command"]
    return float(command[command.index("--grace") + 1])


def test_env_var_names_are_settings_the_code_reads(manifests):
    settings = {f"BORA_{name.upper()}" for name in Settings.model_fields}
    for field in Settings.model_fields.values():  # a renamed setting is read under the names it lists
        if isinstance(field.validation_alias, AliasChoices):
            settings |= {name for name in field.validation_alias.choices if isinstance(name, str)}
    for variant, docs in manifests.items():
        names = set(find(docs, "ConfigMap", "bora-config")["data"])
        for doc in workloads(docs):
            for c in containers(doc):
                names |= {var["name"] for var in c.get("env", [])}
        unknown = {n for n in names if n.startswith("BORA_")} - settings
        assert not unknown, f"{variant}: not BORA_* settings of service/jobs/config.py: {sorted(unknown)}"
        assert {n for n in names if not n.startswith("BORA_")} <= {"REDIS_PASSWORD", "REDISCLI_AUTH"}


def test_commands_images_and_settings_match_compose(manifests, compose):
    services = compose["services"]
    gpu, cpu = manifests["gpu"], manifests["cpu"]
    worker_command = [compose_default(part) for part in services["worker"]["command"]]
    assert container(find(gpu, "Deployment", "worker"), "worker")["command"] == worker_command
    assert container(find(gpu, "Deployment", "webhooks"), "webhooks")["command"] == services["webhooks"]["command"]
    assert container(find(cpu, "Deployment", "worker"), "model-tiny")["command"] == services["model-tiny"]["command"]
    redis = container(find(gpu, "StatefulSet", "redis"), "redis")
    assert redis["command"] == [part.replace("$$", "$") for part in services["redis"]["command"]]
    assert redis["image"] == services["redis"]["image"]
    # The images compose builds, under the names kustomize's `images:` rewrites.
    for docs, deployment, service in ((gpu, "api", "api"), (gpu, "worker", "worker"), (cpu, "worker", "worker-cpu")):
        image = container(find(docs, "Deployment", deployment), deployment)["image"]
        assert image.split(":")[0] == compose_default(services[service]["image"]).split(":")[0]
    # Shared settings: the same values as compose's defaults.
    config = find(gpu, "ConfigMap", "bora-config")["data"]
    for name in ("BORA_KEY_PREFIX", "BORA_RETENTION_SECONDS", "BORA_STORE_PROMPT", "BORA_JOB_TIMEOUT_SECONDS",
                 "BORA_WORKER_METRICS_PORT"):
        assert config[name] == compose_default(compose["x-bora-env"][name]), name
    worker_env = env_of(container(find(gpu, "Deployment", "worker"), "worker"))
    for name in ("BORA_MODEL_DIR", "BORA_DEVICE", "BORA_TEXT_ENCODER_DEVICE", "BORA_TEXT_ENCODER_DTYPE"):
        assert worker_env[name] == compose_default(services["worker"]["environment"][name]), name
    cpu_env = env_of(container(find(cpu, "Deployment", "worker"), "worker"))
    for name in ("BORA_MODEL_DIR", "BORA_DEVICE"):
        assert cpu_env[name] == services["worker-cpu"]["environment"][name], name


def test_ports_and_probe_paths_match_the_code_and_compose(gpu, compose):
    services = compose["services"]
    api = container(find(gpu, "Deployment", "api"), "api")
    api_port = port_of(api, "http")
    assert api_port == Settings.model_fields["port"].default == int(services["api"]["environment"]["BORA_PORT"])
    assert str(api_port) == env_of(api)["BORA_PORT"]
    assert f"http://127.0.0.1:{api_port}/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    readiness = urllib.parse.urlsplit(api["readinessProbe"]["exec"]["command"][-1])
    assert readiness.port == api_port
    from service.main import app  # torch-free; the app answers the paths the probes and Prometheus ask for

    client = TestClient(app, raise_server_exceptions=False)  # no lifespan, no Redis: routed is what counts
    for path in (api["livenessProbe"]["httpGet"]["path"], readiness.path, "/metrics"):
        assert client.get(path).status_code != 404, f"the API has no route {path}"
    assert client.get("/no-such-probe").status_code == 404
    annotations = find(gpu, "Deployment", "api")["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(api_port), "/metrics")

    worker = find(gpu, "Deployment", "worker")
    main = container(worker, "worker")
    metrics_port = port_of(main, "metrics")
    assert metrics_port == Settings.model_fields["worker_metrics_port"].default
    assert [str(metrics_port)] == services["worker"]["expose"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    service_ports = find(gpu, "Service", "api")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service_ports] == [(api_port, "http")]


def test_worker_serves_its_probe_path(gpu):
    """The worker's readiness path, asked of the worker's real metrics server: 200 when ready, else 503."""
    probe = container(find(gpu, "Deployment", "worker"), "worker")["readinessProbe"]["httpGet"]["path"]
    problem: list[str | None] = ["loading the model"]
    port = WorkerMetrics().serve(free_port(), addr="127.0.0.1", health=lambda: problem[0])
    with pytest.raises(urllib.error.HTTPError) as loading:
        urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=5)
    assert loading.value.code == 503
    problem[0] = None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=5) as response:
        assert response.status == 200


def test_grace_periods_outlast_the_processes_own(gpu, compose):
    worker = find(gpu, "Deployment", "worker")
    grace = grace_seconds(worker)
    compose_command = compose["services"]["worker"]["command"]
    assert grace == float(compose_default(compose_command[compose_command.index("--grace") + 1]))
    # SIGKILL only after the grace, a denoising step, the upload and the re-queue write.
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 30
    api = find(gpu, "Deployment", "api")
    drain = re.search(r"--timeout-graceful-shutdown (\d+)", (REPO_ROOT / "docker/Dockerfile.api").read_text())
    assert drain
    pre_stop = container(api, "api")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + int(drain.group(1)) + 5
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed
