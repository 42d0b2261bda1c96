"""Typed dependencies for route handlers; everything comes from the app's state, built once in main."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue

from service.api.admission import Admission
from service.api.errors import Unauthorized
from service.api.metrics import ApiMetrics
from service.jobs.config import Settings
from service.jobs.models import ModelSpec
from service.jobs.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_model_spec(request: Request) -> ModelSpec:
    return request.app.state.model_spec


def get_request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def get_admission(request: Request) -> Admission:
    return request.app.state.admission


def get_tenant(request: Request) -> str:
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
AdmissionDep = Annotated[Admission, Depends(get_admission)]
TenantDep = Annotated[str, Depends(get_tenant)]
