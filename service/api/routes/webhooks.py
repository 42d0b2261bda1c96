"""Webhook routes: a job's delivery attempts, and the caller's signing secret."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import RedisDep, SettingsDep, TenantDep
from service.api.errors import NotFound
from service.api.routes.responses import errors
from service.api.routes.videos import JobId, load
from service.jobs import webhooks
from service.jobs.schemas import WebhookAttempt, WebhookAttemptList, WebhookSecret

router = APIRouter(tags=["webhooks"])


@router.get(
    "/v1/videos/{job_id}/webhook-attempts",
    response_model=WebhookAttemptList,
    summary="Webhook delivery attempts of a job",
    description="Every attempt to deliver this job's webhook events, oldest first, with the answer or error "
    "and when the next retry is due. Failed deliveries are retried with backoff for over 24 h.",
    responses=errors(404, 422, 503),
)
def webhook_attempts(job_id: JobId, settings: SettingsDep, r: RedisDep, tenant: TenantDep) -> WebhookAttemptList:
    load(r, job_id, settings, tenant)
    data = [WebhookAttempt.model_validate(a) for a in webhooks.attempts(r, settings.key_prefix, job_id)]
    return WebhookAttemptList(data=data)


@router.get(
    "/v1/webhook-secret",
    response_model=WebhookSecret,
    summary="Your webhook signing secret",
    description="The `whsec_…` secret our `webhook-signature` headers are made with (Standard Webhooks: "
    "HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`). One per tenant; any Standard Webhooks "
    "library verifies deliveries with it.",
    responses=errors(404),
)
def webhook_secret(settings: SettingsDep, tenant: TenantDep) -> WebhookSecret:
    secret = webhooks.secret_for(settings, tenant)
    if secret is None:
        raise NotFound("webhooks are not enabled on this server", code="webhooks_disabled")
    return WebhookSecret(tenant=tenant, secret=secret)
