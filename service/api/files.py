"""A stored file as an HTTP response: conditional GET and byte ranges as RFC 9110 asks, errors as JSON.

Starlette's FileResponse answers a malformed `Range` with a plain-text 400 and an unsatisfiable one with a
plain-text 416. RFC 9110 §14.2 lets a server ignore a Range it can't parse, which is what a client expects
(it gets the whole file, 200); only a well-formed range that lies wholly past the end is a 416, here with our
JSON error body and `Content-Range: bytes */<size>`. `If-None-Match` with the current ETag is a 304.
"""

from __future__ import annotations

import json
import os
import re

from starlette.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from service.api.errors import RangeNotSatisfiable

_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def range_status(value: str, size: int) -> str:
    """`ignore` (malformed or not bytes: serve it all), `unsatisfiable`, or `ok` for a `Range` header value."""
    unit, _, specs = value.partition("=")
    if unit.strip().lower() != "bytes" or not specs.strip():
        return "ignore"
    satisfiable = False
    for spec in specs.split(","):
        match = _RANGE_SPEC.match(spec)
        if match is None or match.groups() == ("", ""):
            return "ignore"
        first, last = match.groups()
        if first and last and int(first) > int(last):
            return "ignore"
        satisfiable |= int(last) > 0 if not first else int(first) < size
    return "ok" if satisfiable else "unsatisfiable"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2): `*`, or any listed tag equal to ours ignoring `W/`."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


class StoredFileResponse(FileResponse):
    """FileResponse with the Range and If-None-Match handling of the module docstring."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        etag = self.headers.get("etag")
        if etag and "if-none-match" in headers and etag_matches(headers["if-none-match"], etag):
            kept = {k: v for k, v in self.headers.items() if k in ("etag", "cache-control", "content-location")}
            await Response(status_code=304, headers=kept)(scope, receive, send)
            return
        if "range" in headers:
            size = os.stat(self.path).st_size
            status = range_status(headers["range"], size)
            if status == "ignore":
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
            elif status == "unsatisfiable":
                error = RangeNotSatisfiable(f"the range {headers['range']!r} lies past the end of the {size}-byte file")
                body = json.dumps(error.body()).encode()
                response = Response(body, status_code=416, media_type="application/json",
                                    headers={"Content-Range": f"bytes */{size}"})
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
