"""Typed dependencies for route handlers; everything comes from the app's `Api`, built once in app.py.

All are `async def`: FastAPI runs a plain `def` dependency in its threadpool, a thread hop per dependency per
request, for what is an attribute read. The hot routes (submit, read a job) take the whole `Api` as one
dependency: FastAPI's cost per dependency is a measurable share of a request that does one Redis round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from service.api.errors import Unauthorized
from service.api.metrics import ApiMetrics
from service.jobs.admission import Limits
from service.jobs.config import Settings
from service.jobs.models import ModelSpec
from service.jobs.storage import Storage


@dataclass(frozen=True)
class Api:
    """The app's long-lived parts (`app.state.api`)."""

    settings: Settings
    redis: Redis
    aredis: AsyncRedis  # the hot routes' client: they await Redis on the event loop, no thread hop
    queue: Queue
    storage: Storage
    metrics: ApiMetrics
    model_spec: ModelSpec
    limits: Limits


async def get_settings(request: Request) -> Settings:
    return request.app.state.api.settings


async def get_redis(request: Request) -> Redis:
    return request.app.state.api.redis


async def get_storage(request: Request) -> Storage:
    return request.app.state.api.storage


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.api.metrics


async def get_request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def get_tenant(request: Request) -> str:
    """The caller's tenant, set by `service.api.auth.AuthMiddleware` (`default` when auth is disabled)."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # a route outside the protected paths asked for a tenant: refuse rather than guess
        raise Unauthorized("this route needs an API key", code="missing_api_key")
    return str(tenant)


@dataclass(frozen=True)
class Caller:
    """Everything a hot route needs, as one dependency: the app's parts and who is calling."""

    api: Api
    tenant: str
    request_id: str | None


async def get_caller(request: Request) -> Caller:
    return Caller(request.app.state.api, await get_tenant(request), await get_request_id(request))


CallerDep = Annotated[Caller, Depends(get_caller)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StorageDep = Annotated[Storage, Depends(get_storage)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
RequestIdDep = Annotated[str | None, Depends(get_request_id)]
TenantDep = Annotated[str, Depends(get_tenant)]
