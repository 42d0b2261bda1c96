"""ASGI middleware: request ids, and the limits every request meets before a route runs (JSON errors)."""

from __future__ import annotations

import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import (
    ApiError,
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    UnsupportedMediaType,
    UriTooLong,
)

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
MAX_HEADER_BYTES = 16 * 1024  # all request headers together: bearer keys, ids and cookies are far smaller
MAX_TARGET_BYTES = 8 * 1024  # path + query: ids are 36 characters, cursors ~60
_JSON_MEDIA_TYPE = re.compile(rb"^application/(?:[\w.+-]+\+)?json$")


class RequestIdMiddleware:
    """Keeps a client's `X-Request-ID` (when sane) or makes one; stores it in scope["state"] and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"")
        request_id = given.decode() if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestLimitsMiddleware:
    """The limits of a request, as JSON errors before any route or body parsing: headers over MAX_HEADER_BYTES
    (431) and path + query over MAX_TARGET_BYTES (414) for every request; for one with a body, a media type
    other than JSON (415) and a body over `max_bytes` (413: at once from Content-Length, else after buffering
    at most `max_bytes` of a chunked body; bodies here are small JSON)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            await _reject(send, HeadersTooLarge(f"request headers over {MAX_HEADER_BYTES} bytes"))
            return
        if len(scope.get("raw_path") or b"") + len(scope["query_string"]) > MAX_TARGET_BYTES:
            await _reject(send, UriTooLong(f"request target over {MAX_TARGET_BYTES} bytes"))
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        length = headers.get(b"content-length")
        if media_type and not _JSON_MEDIA_TYPE.match(media_type) and length != b"0":
            await _reject(send, UnsupportedMediaType(
                f"request bodies are JSON: send Content-Type: application/json, not {media_type.decode('latin-1')}"))
            return
        if length is not None:
            if not length.isdigit():
                await _reject(send, BadRequest("Content-Length is not a number", code="bad_request"))
                return
            if int(length) > self.max_bytes:
                await _reject(send, PayloadTooLarge(f"request body over {self.max_bytes} bytes"))
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): buffer up to the limit, then replay.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await _reject(send, PayloadTooLarge(f"request body over {self.max_bytes} bytes"))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        await self.app(scope, _replay(replayed, then=receive), send)


async def _reject(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
