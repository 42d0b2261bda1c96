"""`Authorization: Bearer <key>` on the API's routes; the key's tenant becomes `request.state.tenant`.

Protected: every `/v1` path and `/generate`, plus `/healthz` + `/readyz` and `/metrics` when
BORA_AUTH_PROTECT_HEALTH / BORA_AUTH_PROTECT_METRICS say so. The OpenAPI document and `/docs` stay open.
A missing, malformed, wrong or revoked key is a 401 JSON error with `WWW-Authenticate: Bearer`, answered
before the body is read. With BORA_AUTH=disabled every request is tenant `default` - on loopback only: `Settings`
refuses the setting with a non-loopback BORA_HOST, and since a server started by hand (`uvicorn --host 0.0.0.0`)
never reads BORA_HOST, each protected request must also have arrived on a loopback address (the ASGI
`scope["server"]`, the local end of the connection); any other answers 401 `auth_disabled_off_loopback`.

Why ASGI middleware rather than a route dependency: it covers every `/v1` route, including ones added later,
without each having to remember it, and it answers before FastAPI parses a body. The same `is_protected`
decides what `document` marks as secured in the OpenAPI spec, so the docs cannot drift from the check.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import Unauthorized
from service.jobs.config import Settings, is_loopback
from service.keys import KeyStore

DEFAULT_TENANT = "default"  # the one tenant when BORA_AUTH=disabled
SCHEME_NAME = "bearerAuth"


def protected_paths(settings: Settings) -> Callable[[str], bool]:
    """The predicate `path -> needs a key` for these settings."""
    extra = set()
    if settings.auth_protect_health:
        extra |= {"/healthz", "/readyz"}
    if settings.auth_protect_metrics:
        extra.add("/metrics")

    def is_protected(path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or path == "/generate" or path in extra

    return is_protected


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, keys: KeyStore) -> None:
        self.app = app
        self.required = settings.auth == "required"
        self.is_protected = protected_paths(settings)
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.required:
            if self.is_protected(scope["path"]) and not on_loopback(scope):
                await _reject(send, Unauthorized(
                    "this server runs with BORA_AUTH=disabled, which serves requests on a loopback address only; "
                    "its operator must create API keys and set BORA_AUTH=required", code="auth_disabled_off_loopback"))
                return
            state["tenant"] = DEFAULT_TENANT
        elif self.is_protected(scope["path"]):
            token = bearer_token(scope["headers"])
            if token is None:
                await _reject(send, Unauthorized(
                    "send your API key as `Authorization: Bearer <key>`", code="missing_api_key"))
                return
            # A key verified before is answered here; PBKDF2 on one not seen before takes milliseconds: off the loop.
            tenant = self.keys.authenticate_cached(token) or await anyio.to_thread.run_sync(
                self.keys.authenticate, token)
            if tenant is None:
                await _reject(send, Unauthorized("the API key is not valid (unknown, revoked or mistyped)"))
                return
            state["tenant"] = tenant
        await self.app(scope, receive, send)


def on_loopback(scope: Scope) -> bool:
    """True when the request came in on a loopback address, or on a Unix socket (uvicorn: `(path, None)`)."""
    server = scope.get("server")
    return server is None or server[1] is None or is_loopback(str(server[0]))


async def _reject(send: Send, error: Unauthorized) -> None:
    body = json.dumps(error.body()).encode()
    challenge = b'Bearer realm="bora"' + (b', error="invalid_token"' if error.code == "invalid_api_key" else b"")
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def document(app: FastAPI, settings: Settings) -> None:
    """Declare the bearer scheme in the OpenAPI spec, with a 401 answer on every protected operation."""
    if settings.auth != "required":
        return
    is_protected = protected_paths(settings)
    build = app.openapi
    # ErrorBody is in every spec already (the routes declare it for their other errors).
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    challenge = {"WWW-Authenticate": {"description": "`Bearer`: the scheme to authenticate with.",
                                      "schema": {"type": "string"}}}
    unauthorized = {"401": {"description": "Missing, wrong or revoked API key.", "content": error_body,
                            "headers": challenge}}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        spec.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME_NAME] = {
            "type": "http", "scheme": "bearer", "description": "An API key from `bora keys create --tenant NAME`."
        }
        for path, operations in spec.get("paths", {}).items():
            if is_protected(path):
                for operation in operations.values():
                    operation["security"] = [{SCHEME_NAME: []}]
                    operation.setdefault("responses", {}).update(unauthorized)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]

