"""API metrics (prometheus-client), one registry per app. Names are fixed by the shared spec.

Request count/latency are recorded by `MetricsMiddleware` per route template (never the raw path, so ids do
not explode the label set). Queue depth, ready workers and finished jobs are read from Redis at scrape
time by `RedisCollector`, so every API replica reports the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.jobs import heartbeats, jobstore, retention

log = logging.getLogger(__name__)

disable_created_metrics()  # no `*_created` series; they only clutter dashboards

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self, redis: Redis, *, prefix: str, heartbeat_ttl_seconds: float) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bora_http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bora_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "bora_jobs_submitted_total", "Video jobs accepted (202), by model.", ["model"], registry=self.registry
        )
        self.registry.register(RedisCollector(redis, prefix=prefix, heartbeat_ttl_seconds=heartbeat_ttl_seconds))


class RedisCollector(Collector):
    """Read from Redis at scrape: queue depth, ready workers, finished jobs by status/code, retention deletions."""

    def __init__(self, redis: Redis, *, prefix: str, heartbeat_ttl_seconds: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.heartbeat_ttl_seconds = heartbeat_ttl_seconds

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("bora_redis_up", "1 when the API could read Redis during this scrape.")
        try:
            depth = self.redis.llen(jobstore.Keys(self.prefix).rq_queue)
            ready = len(
                heartbeats.ready_workers(self.redis, prefix=self.prefix, max_age_seconds=self.heartbeat_ttl_seconds)
            )
            finished = jobstore.finished_counts(self.redis, prefix=self.prefix)
            active, overdue = jobstore.active_counts(self.redis, prefix=self.prefix)
            swept_objects, swept_jobs = retention.deleted_counts(self.redis, prefix=self.prefix)
        except RedisError as exc:
            log.warning("metrics: redis unreachable at scrape: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("bora_queue_depth", "Video jobs waiting in the queue.", value=depth)
        yield GaugeMetricFamily(
            "bora_workers_ready", "Workers with a fresh heartbeat and their model loaded.", value=ready
        )
        yield GaugeMetricFamily("bora_jobs_active", "Video jobs not terminal yet (queued, running, canceling).",
                                value=active)
        yield GaugeMetricFamily(
            "bora_jobs_overdue",
            "Video jobs still not terminal past their deadline (queue expiry + run limit + margins): the reaper "
            "should have ended them.",
            value=overdue,
        )
        family = CounterMetricFamily(
            "bora_jobs_finished", "Video jobs that reached a terminal status, by status and error code.",
            labels=["status", "code"],
        )
        for (status, code), count in sorted(finished.items()):
            family.add_metric([status, code], count)
        yield family
        yield CounterMetricFamily(
            "bora_retention_deleted_objects", "Stored objects deleted because their job passed BORA_RETENTION_SECONDS.",
            value=swept_objects,
        )
        yield CounterMetricFamily(
            "bora_retention_deleted_jobs", "Jobs whose outputs were deleted because they passed BORA_RETENTION_SECONDS.",
            value=swept_jobs,
        )


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (`/v1/videos/{job_id}`); unmatched paths are
    labelled `unmatched`."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)
