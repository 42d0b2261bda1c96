"""Typed dependencies for route handlers; everything comes from the app's state, built once in main.

All are `async def`: FastAPI runs a plain `def` dependency in its threadpool, a thread hop per dependency per
request, for what is an attribute read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue

from service.api.errors import Unauthorized
from service.api.metrics import ApiMetrics
from service.jobs.admission import Limits
from service.jobs.config import Settings
from service.jobs.models import ModelSpec
from service.jobs.storage import Storage


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


async def get_queue(request: Request) -> Queue:
    return request.app.state.queue


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


async def get_model_spec(request: Request) -> ModelSpec:
    return request.app.state.model_spec


async def get_request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


async def get_tenant(request: Request) -> str:
    """The caller's tenant, set by `service.api.auth.AuthMiddleware` (`default` when auth is disabled)."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # a route outside the protected paths asked for a tenant: refuse rather than guess
        raise Unauthorized("this route needs an API key", code="missing_api_key")
    return str(tenant)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StorageDep = Annotated[Storage, Depends(get_storage)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
ModelSpecDep = Annotated[ModelSpec, Depends(get_model_spec)]
RequestIdDep = Annotated[str | None, Depends(get_request_id)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
TenantDep = Annotated[str, Depends(get_tenant)]
