"""OpenAPI `responses=` declarations: every error answer carries the `ErrorBody` schema; `json_answer` for the
hot routes."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from pydantic import BaseModel

from service.jobs.schemas import ErrorBody

_DESCRIPTIONS = {
    400: "Malformed request.",
    404: "No such job (or route).",
    405: "Method not allowed.",
    409: "The job is not in a state that allows this.",
    413: "Request body too large.",
    414: "Path and query over 8 KiB.",
    415: "The request body is not JSON (`Content-Type: application/json`).",
    416: "The Range lies past the end of the file; `Content-Range: bytes */<size>` gives the size.",
    422: "A field is invalid; `error.param` names it (e.g. `body.num_frames`).",
    429: "Over a rate limit or queue cap; see `Retry-After`.",
    503: "Redis (or storage) unreachable, or not ready; retry shortly.",
}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_HEADERS = {429: _RETRY_AFTER, 503: _RETRY_AFTER}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Every declared error answers `ErrorBody`; routes with parameters declare 422 themselves, or FastAPI would
    document its own `HTTPValidationError` shape, which this API never sends."""
    return {
        code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} | ({"headers": _HEADERS[code]} if code in _HEADERS else {})
        for code in codes
    }


def json_answer(model: BaseModel, *, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`model`, already valid, serialized once by pydantic. Returning it as a Response skips FastAPI's
    `response_model` pass (a second validation, run in the threadpool for a `def` route, then a JSON encode in
    Python); the route keeps `response_model` for the OpenAPI document, which `tests/service/test_openapi_fuzz.py`
    checks against what the server answers."""
    return Response(model.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")
