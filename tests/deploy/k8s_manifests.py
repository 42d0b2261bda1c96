"""The Kustomize overlays rendered offline (`kubectl kustomize`), shared by the Kubernetes tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from deploy_files import REPO_ROOT, require_binary

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = {
    "gpu": K8S_DIR / "overlays" / "gpu",
    "cpu": K8S_DIR / "overlays" / "cpu",
}
KEDA_SCHEMAS = Path(__file__).parent / "schemas"


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_binary("kubectl", "kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def hpa_variant(tmp: Path) -> Path:
    """The gpu overlay with the documented plain-HPA component in place of KEDA's (docs/deploy.md), in tmp."""
    gpu = OVERLAYS["gpu"]
    kustomization = yaml.safe_load((gpu / "kustomization.yaml").read_text())
    resources = []
    for entry in kustomization["resources"]:  # directories by relative path; files copied (kustomize reads
        if (gpu / entry).is_dir():              # files only below the kustomization's own folder)
            resources.append(os.path.relpath((gpu / entry).resolve(), tmp))
        else:
            shutil.copy(gpu / entry, tmp / entry)
            resources.append(entry)
    for patch in kustomization.get("patches", []):
        shutil.copy(gpu / patch["path"], tmp / patch["path"])
    assert kustomization["components"] == ["../../components/keda"], kustomization["components"]
    kustomization["resources"] = resources
    kustomization["components"] = [os.path.relpath(K8S_DIR / "components" / "worker-hpa", tmp)]
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return tmp


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(doc) if c["name"] == name]
    return found


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}]
