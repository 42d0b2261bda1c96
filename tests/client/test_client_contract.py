"""The client's own models (bora_client/models.py) against the service's OpenAPI document, and its webhook
verifier against the service's signer."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from pydantic import BaseModel

from bora_client import WebhookVerificationError, verify_webhook
from bora_client import models as client_models
from service.jobs.webhooks import sign, signed_headers, tenant_webhook_secret
from tests.client.stack import Stack

SAME_SHAPE = {
    "VideoJob": client_models.Job,
    "JobList": client_models.JobList,
    "Outputs": client_models.Outputs,
    "FileOutput": client_models.FileOutput,
    "VideoOutput": client_models.VideoOutput,
    "ImageOutput": client_models.ImageOutput,
    "VideoInput": client_models.VideoInput,
    "JobWarning": client_models.JobWarning,
    "JobError": client_models.JobError,
    "Timings": client_models.Timings,
    "Webhook": client_models.Webhook,
}


@pytest.mark.parametrize("schema_name", sorted(SAME_SHAPE))
def test_models_match_the_openapi_schema(stack: Stack, schema_name: str) -> None:
    schemas = httpx.get(f"{stack.base}/openapi.json").json()["components"]["schemas"]
    model: type[BaseModel] = SAME_SHAPE[schema_name]
    server = schemas[schema_name]
    assert set(model.model_fields) == set(server["properties"])
    assert {name for name, f in model.model_fields.items() if f.is_required()} == set(server.get("required", []))


def test_verify_webhook_accepts_the_services_signature() -> None:
    secret = tenant_webhook_secret("master", "clinic")
    body = json.dumps({"type": "video.succeeded", "data": {"id": "vid_1"}}).encode()
    headers = signed_headers(secret, "msg_1", body)
    assert verify_webhook(secret, headers, body)["type"] == "video.succeeded"
    assert verify_webhook(secret, {k.upper(): v for k, v in headers.items()}, body.decode())["data"]["id"] == "vid_1"
    rotated = {**headers, "webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]}
    assert verify_webhook(secret, rotated, body)


@pytest.mark.parametrize("case", ["body", "secret", "old", "future", "missing", "version"])
def test_verify_webhook_refuses(case: str) -> None:
    secret = tenant_webhook_secret("master", "clinic")
    body = b'{"type": "video.failed"}'
    now = int(time.time())
    headers = signed_headers(secret, "msg_2", body, timestamp=now)
    kwargs: dict = {}
    if case == "body":
        body = b'{"type": "video.succeeded"}'
    elif case == "secret":
        secret = "whsec_" + base64.b64encode(b"another key").decode()
    elif case == "old":
        kwargs["now"] = now + 301
    elif case == "future":
        kwargs["now"] = now - 301
    elif case == "missing":
        del headers["webhook-signature"]
    elif case == "version":
        headers["webhook-signature"] = "v2," + sign(secret, "msg_2", now, body).split(",", 1)[1]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, body, **kwargs)
