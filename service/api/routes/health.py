"""`/healthz` (process alive), `/readyz` (Redis reachable and a worker ready), `/metrics` (Prometheus).

`/readyz` is open to anyone who can reach the port (load balancers, orchestrators), so it tells status and
counts only: worker ids, hosts, pids, weights and the job each worker runs belong to operators (each worker's
own `:9100/healthz`, the metrics), not to every tenant.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError

from service.api.deps import MetricsDep, RedisDep, SettingsDep
from service.api.routes.responses import errors
from service.jobs import heartbeats
from service.jobs.schemas import WorkerHeartbeat, WorkerState

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str
    redis: str
    workers_ready: int
    workers_by_state: dict[WorkerState, int]


def _by_state(workers: list[WorkerHeartbeat]) -> dict[str, int]:
    return {state.value: sum(w.state == state for w in workers) for state in WorkerState}


@router.get("/healthz", response_model=Health, summary="The API process is alive")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Ready: Redis reachable and at least one worker with its model loaded",
    responses=errors(503),
)
def readyz(settings: SettingsDep, r: RedisDep) -> Any:
    try:
        r.ping()
        workers = heartbeats.list_workers(
            r, prefix=settings.key_prefix, max_age_seconds=settings.heartbeat_ttl_seconds
        )
    except RedisError as exc:
        return _not_ready(f"redis unreachable: {type(exc).__name__}", redis="unreachable", workers=[])
    ready = [w for w in workers if w.state in heartbeats.READY_STATES]
    if not ready:
        states = ", ".join(f"{n} {state}" for state, n in _by_state(workers).items() if n) or "none alive"
        return _not_ready(
            f"no worker ready (workers: {states}); jobs are accepted and wait in the queue",
            redis="ok",
            workers=workers,
        )
    return Readiness(status="ready", redis="ok", workers_ready=len(ready), workers_by_state=_by_state(workers))


def _not_ready(reason: str, *, redis: str, workers: list[WorkerHeartbeat]) -> JSONResponse:
    body = {
        "error": {"type": "unavailable_error", "code": "not_ready", "message": reason, "param": None},
        "status": "not_ready",
        "redis": redis,
        "workers_ready": 0,
        "workers_by_state": _by_state(workers),
    }
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", include_in_schema=False)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
