"""A second worker on a host with the same BORA_WORKER_METRICS_PORT stops at once with the reason and the
remedy, not a traceback."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys

from tests.support import REPO_ROOT, stack_env
from tests.worker.conftest import REDIS_URL


def test_a_taken_metrics_port_is_a_clear_start_up_error(tmp_path, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = stack_env(REDIS_URL, "mp" + secrets.token_hex(4), tmp_path, tiny_model_dir, 8000,
                        BORA_WORKER_METRICS_PORT=str(port))
        worker = subprocess.run([sys.executable, "-m", "worker.main", "--burst"], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2
    assert "Traceback" not in worker.stderr
    assert f"cannot serve /metrics and /healthz on port {port}" in worker.stderr
    assert "BORA_WORKER_METRICS_PORT" in worker.stderr
