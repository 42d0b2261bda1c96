"""OpenAPI `responses=` declarations: every error answer carries the `ErrorBody` schema."""

from __future__ import annotations

from typing import Any

from service.jobs.schemas import ErrorBody

_DESCRIPTIONS = {
    400: "Malformed request.",
    404: "No such job (or route).",
    405: "Method not allowed.",
    409: "The job is not in a state that allows this.",
    413: "Request body too large.",
    422: "A field is invalid; `error.param` names it (e.g. `body.num_frames`).",
    429: "Over a rate limit or queue cap; see `Retry-After`.",
    503: "Redis (or storage) unreachable, or not ready; retry shortly.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}
