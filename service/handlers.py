"""Turns every error into `{"error": {"type", "code", "message", "param"}}` JSON at the HTTP edge."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    ApiError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)

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


async def redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s -> 503: redis unavailable: %s", request.method, request.url.path, exc)
    error = ServiceUnavailable(
        "the job store (Redis) is unreachable; retry shortly", code="redis_unavailable", headers={"Retry-After": "2"}
    )
    return error_response(error)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s -> 500", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError("internal error; it has been logged"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RedisConnectionError, redis_error)
    app.add_exception_handler(RedisTimeoutError, redis_error)
    app.add_exception_handler(Exception, unexpected_error)
