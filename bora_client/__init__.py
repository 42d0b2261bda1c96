"""Python client of the Bora video service: needs httpx, pydantic and tqdm only (`pip install
'bora-service[client]'`), never torch or FastAPI.

    from bora_client import Client

    with Client("http://127.0.0.1:8000", api_key="bora_...") as bora:   # or BORA_BASE_URL / BORA_API_KEY
        job = bora.create("An echocardiogram of a beating heart", seed=42)
        job = bora.wait(job, progress=True)          # live events, a tqdm bar; falls back to polling
        bora.download(job, "heart.mp4")              # streamed, sha256 checked against the job record

`AsyncClient` has the same methods, awaited. Errors are `BoraError` subclasses (`AuthenticationError`,
`RateLimitError`, ...) carrying the API's `code`, `message` and `param`.
"""

from bora_client.async_client import AsyncClient
from bora_client.client import Client
from bora_client.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BoraError,
    ChecksumMismatchError,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from bora_client.models import Job, JobList
from bora_client.webhooks import verify_webhook

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncClient",
    "AuthenticationError",
    "BoraError",
    "ChecksumMismatchError",
    "Client",
    "ConflictError",
    "InternalServerError",
    "InvalidRequestError",
    "Job",
    "JobList",
    "NotFoundError",
    "RateLimitError",
    "ServiceUnavailableError",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "verify_webhook",
]
