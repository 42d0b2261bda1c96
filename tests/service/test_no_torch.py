"""The API never imports torch (nor the model or worker packages): checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.service.conftest import REPO_ROOT

CODE = """
import json, sys
from service.api.app import create_app
from service.jobs.config import Settings
import service.devserver, service.jobs.storage, service.jobs.jobstore, service.jobs.heartbeats, service.jobs.models
import service.webhook_sender, service.jobs.logs, service.jobs.audit  # the webhook sender runs from the API image
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
from fastapi.testclient import TestClient
TestClient(app).get("/openapi.json")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "model", "worker", "diffusers",
                                                                    "transformers", "numpy"))))
"""


def test_service_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "model", "worker", "diffusers", "transformers")]
