"""Typed exceptions. Every error the API answers is `{"error": {"type", "code", "message", "param"}}`;
`APIStatusError.from_response` turns it into the subclass for its HTTP status, keeping every field."""

from __future__ import annotations

import json
from typing import Any


class BoraError(Exception):
    """Base class of everything this client raises."""


class APIConnectionError(BoraError):
    """The service could not be reached (or the connection broke) after every retry."""


class APIStatusError(BoraError):
    """The service answered 4xx/5xx. `code` is the specific reason (`invalid_api_key`, `rate_limited`, ...)."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status_code} {code or 'error'}: {message}")
        self.message = message
        self.status_code = status_code
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body

    @classmethod
    def from_response(cls, status_code: int, headers: Any, content: bytes) -> APIStatusError:
        """The exception for one error answer, whatever its body (a proxy's HTML page included)."""
        from bora_client._http import parse_retry_after

        body: Any = None
        detail: dict[str, Any] = {}
        try:
            body = json.loads(content) if content else None
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                detail = body["error"]
        except ValueError:
            body = content.decode("utf-8", "replace")
        message = str(detail.get("message") or (body if isinstance(body, str) and body else "") or f"HTTP {status_code}")
        error_class = _BY_STATUS.get(status_code) or (InternalServerError if status_code >= 500 else APIStatusError)
        return error_class(
            message[:2000],
            status_code=status_code,
            type=detail.get("type"),
            code=detail.get("code"),
            param=detail.get("param"),
            request_id=headers.get("x-request-id"),
            retry_after=parse_retry_after(headers.get("retry-after")),
            body=body,
        )


class InvalidRequestError(APIStatusError):
    """400, 413, 415, 422, 431: the request itself is wrong; `param` names the field."""


class AuthenticationError(APIStatusError):
    """401: missing, wrong or revoked API key."""


class NotFoundError(APIStatusError):
    """404: no such job for this API key (another tenant's job looks the same), or no such route."""


class ConflictError(APIStatusError):
    """409: e.g. cancel a finished job, content of a job that has not succeeded, a reused Idempotency-Key."""


class RateLimitError(APIStatusError):
    """429: over the submission rate or a queue cap; `retry_after` says when to try again."""


class InternalServerError(APIStatusError):
    """5xx other than 503."""


class ServiceUnavailableError(APIStatusError):
    """503: Redis or object storage is unavailable for now; `retry_after` says when to try again."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    431: InvalidRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


class ChecksumMismatchError(BoraError):
    """A downloaded file's sha256 differs from the one in the job record; the file was not kept."""


class WaitTimeoutError(BoraError, TimeoutError):
    """`wait(..., timeout=...)` ran out before the job ended. `job` is its last known state."""

    def __init__(self, message: str, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


class WebhookVerificationError(BoraError):
    """A webhook delivery's signature or timestamp did not check out."""
