"""The package contracts, checked two ways: every import statement in the source (function-local ones too),
and what a fresh interpreter has loaded after importing every module of a package.

- `model` imports neither `service` nor `worker` (it knows nothing of HTTP, Redis or storage);
- the job domain `service.jobs` imports no FastAPI/Starlette, no torch, and not the HTTP package;
- `worker` never imports the HTTP package `service.api` (nor FastAPI).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# package folder -> top-level-or-dotted module names it must never import
FORBIDDEN = {
    "model": ("service", "worker"),
    "service/jobs": ("fastapi", "starlette", "torch", "service.api", "worker", "diffusers", "transformers"),
    "worker": ("service.api", "fastapi", "starlette"),
}


def _imports(path: Path) -> list[str]:
    """Every module an `import` / `from ... import` in `path` names, resolving relative imports."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from service import api`
    return names


def _hits(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_source_imports_respect_layers(folder):
    bad = [
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for name in _imports(path)
        if _hits(name, FORBIDDEN[folder])
    ]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules(folder: str) -> list[str]:
    return [
        ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((REPO_ROOT / folder).rglob("*.py"))
    ]


def test_domain_loads_no_http_and_no_torch():
    loaded = _loaded_after_importing(_modules("service/jobs") + ["service.webhook_sender", "service.keys"])
    assert not [m for m in loaded if _hits(m, FORBIDDEN["service/jobs"])]


def test_worker_never_loads_the_http_package():
    loaded = _loaded_after_importing(_modules("worker"))
    assert not [m for m in loaded if _hits(m, FORBIDDEN["worker"])]
