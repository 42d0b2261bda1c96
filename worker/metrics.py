"""The worker's Prometheus metrics, served on their own port (BORA_WORKER_METRICS_PORT; 0 = not served).

The same port answers `GET /healthz`: 200 once the model is loaded and the worker takes jobs (heartbeat
state ready or busy), 503 before that and after (starting, loading, failed, stopping); the container
healthcheck probes it. Metric names are fixed by deploy/grafana and deploy/prometheus: change them together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

logger = logging.getLogger(__name__)

STAGES = ("queue_wait", "encoding_text", "denoising", "decoding", "encoding_video", "uploading", "total")
# Seconds; spans a 10 ms upload to a 30-minute XL job.
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, float("inf"))


class WorkerMetrics:
    """One registry per worker process (tests make their own instances freely)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_duration = Histogram(
            "bora_worker_stage_duration_seconds",
            "Time spent per job stage",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.denoising_steps = Counter(
            "bora_worker_denoising_steps_total", "Denoising steps completed", registry=r
        )
        self.steps_per_second = Gauge(
            "bora_worker_denoising_steps_per_second", "Denoising steps per second of the last job", registry=r
        )
        self.model_load_seconds = Gauge(
            "bora_worker_model_load_seconds", "Seconds the resident pipeline took to load", registry=r
        )
        self.busy = Gauge("bora_worker_busy", "1 while a job runs, else 0", registry=r)
        self.gpu_memory = Gauge(
            "bora_worker_gpu_memory_bytes", "Accelerator memory held by this process", ["kind"], registry=r
        )
        self.jobs = Counter(
            "bora_worker_jobs_total", "Jobs finished by this worker", ["status", "code"], registry=r
        )
        self.info = Gauge(
            "bora_worker_info",
            "The model this worker serves",
            ["model", "weights_sha256", "device", "dtype"],
            registry=r,
        )
        for kind in ("allocated", "reserved"):
            self.gpu_memory.labels(kind=kind).set(0)
        self.busy.set(0)

    def set_info(self, model: str, weights_sha256: str, device: str, dtype: str) -> None:
        self.info.clear()
        self.info.labels(model=model, weights_sha256=weights_sha256, device=device, dtype=dtype).set(1)

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.stage_duration.labels(stage=stage).observe(max(seconds, 0.0))

    def job_finished(self, status: str, code: str | None) -> None:
        self.jobs.labels(status=status, code=code or "").inc()

    def update_gpu_memory(self, device: str) -> None:
        """Refresh the allocated/reserved gauges for a CUDA device (no-op, zeros, elsewhere)."""
        if not device.startswith("cuda"):
            return
        import torch

        self.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated(device))
        self.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved(device))

    def serve(
        self, port: int, addr: str = "0.0.0.0", health: Callable[[], str | None] | None = None
    ) -> int | None:
        """Serve /metrics and /healthz from a daemon thread; return the bound port (None if port is 0).

        `health()` returns the problem as text (/healthz answers 503 with it), or None when healthy (200)."""
        if not port:
            return None
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            problem = health() if health else None
            status = "503 Service Unavailable" if problem else "200 OK"
            start_response(status, [("Content-Type", "text/plain")])
            return [(problem or "ok").encode() + b"\n"]

        server = make_server(addr, port, app, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="bora-metrics", daemon=True).start()
        bound = int(server.server_address[1])
        logger.info("worker metrics serving", extra={"port": bound})
        return bound


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes and probes every few seconds: not worth a log line each
