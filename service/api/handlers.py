"""Turns every error into `{"error": {"type", "code", "message", "param"}}` JSON at the HTTP edge."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.errors import (
    ApiError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    from_domain,
)
from service.jobs.errors import JobsError

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    503: ServiceUnavailable,
}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        log.warning("%s %s -> %s %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
    return error_response(exc)


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobsError)
    return await api_error(request, from_domain(exc))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    loc = [str(part) for part in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        loc = loc[:1]  # the position inside the JSON text is not a field
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    error = ApiError(message, code=str(first.get("type", "invalid_value")), param=param)
    error.status, error.type = 422, "invalid_request_error"
    return error_response(error)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    cls = _BY_STATUS.get(exc.status_code)
    if exc.status_code == 404:
        error: ApiError = NotFound(f"no route {request.method} {request.url.path}", code="route_not_found")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif cls is not None:
        error = cls(str(exc.detail))
    else:
        error = ApiError(str(exc.detail), code=f"http_{exc.status_code}")
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "api_error"
    error.headers = dict(exc.headers or {})
    return error_response(error)


# Error codes with which a reachable Redis refuses work for a while: full under `noeviction` (OOM), a
# read-only replica, a failed RDB save with stop-writes-on-bgsave-error (MISCONF), no master or replicas.
# The store is unavailable then (503), not broken; any other Redis error reply is our bug (500).
REDIS_REFUSALS = ("OOM", "READONLY", "MISCONF", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")
# redis-py strips the code of the replies it maps to a class (`status_code`) but not of the others, and
# prefixes a pipeline's error with "Command # n (...) of pipeline caused error: ".
_REFUSAL = re.compile(r"(?:^|caused error: )(" + "|".join(REDIS_REFUSALS) + r")\b")


def redis_refusal(exc: RedisResponseError) -> str | None:
    """The refusal code of a Redis error reply (`OOM`, `MISCONF`, ...), or None for any other error."""
    if exc.status_code in REDIS_REFUSALS:
        return exc.status_code
    match = _REFUSAL.search(str(exc))
    return match.group(1) if match else None


async def redis_error(request: Request, exc: Exception) -> JSONResponse:
    """503 `redis_unavailable` when Redis is unreachable or refuses writes; any other Redis error is a 500."""
    if isinstance(exc, RedisResponseError):
        refusal = redis_refusal(exc)
        if refusal is None:
            return await unexpected_error(request, exc)
        message, retry_after = f"the job store (Redis) refuses requests for now ({refusal}); retry later", "5"
    else:
        message, retry_after = "the job store (Redis) is unreachable; retry shortly", "2"
    log.warning("%s %s -> 503: redis unavailable: %s", request.method, request.url.path, exc)
    return error_response(ServiceUnavailable(message, code="redis_unavailable", headers={"Retry-After": retry_after}))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s -> 500", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError("internal error; it has been logged"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(JobsError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RedisConnectionError, redis_error)
    app.add_exception_handler(RedisTimeoutError, redis_error)
    app.add_exception_handler(RedisResponseError, redis_error)
    app.add_exception_handler(Exception, unexpected_error)
