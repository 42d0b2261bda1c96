"""Admission control for job submissions: a per-tenant rate limit, then the global and per-tenant queue caps.

Over any limit a submission is refused (`Refused`, answered 429 with `Retry-After`), so a GPU fleet's backlog
stays bounded however clients behave. Reads (status, list, content, events) are not limited: they cost one
Redis round trip, and polling clients should not be starved by their own submissions.

Every check runs inside the job's create script (`jobstore.create`), so a submission is one Redis round trip
whose cost does not depend on how many jobs are waiting:
- Rate: a token bucket per tenant, BORA_RATE_LIMIT_PER_SECOND sustained up to BORA_RATE_LIMIT_BURST at once.
  Its state is one string `{P}:rate:{tenant}` = "tokens last_update", expiring once the bucket would be full
  again (idle tenants cost nothing). The clock is the API host's, like every other timestamp a job carries
  (created_at, expiry, deadlines): hosts must keep NTP time; a host skewed by d seconds can let a tenant
  through at most d x rate extra submissions.
- Global cap: jobs waiting in the RQ queue, BORA_MAX_QUEUED_TOTAL. The script pushes the job and takes it off
  again when the push made the queue longer than the cap (the push's reply is the queue's length).
- Per-tenant cap: the tenant's `queued` jobs, BORA_MAX_QUEUED_PER_TENANT, kept as a counter in
  `{P}:queued` (HASH tenant -> jobs queued). Every transition into or out of `queued` moves it by one in the
  same script as the status change (jobstore: create, start, cancel, expiry, failure, the reaper's
  re-queue), so it is exact without scanning; deletion cancels a queued job first. The reaper recounts it
  from the jobs themselves each pass (`reaper.repair_queued_counts`) and logs any drift it corrects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.jobs.config import Settings
from service.jobs.errors import Refused


@dataclass(frozen=True)
class Limits:
    """What the create script enforces; 0 turns a limit off."""

    rate_per_second: float
    burst: int
    max_queued_per_tenant: int
    max_queued_total: int
    queue_full_retry_after_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.rate_limit_per_second, settings.rate_limit_burst, settings.max_queued_per_tenant,
            settings.max_queued_total, settings.queue_full_retry_after_seconds,
        )


# Outcomes of the create script that refuse the job (jobstore.create turns them into `Refused`).
RATE_LIMITED, TENANT_FULL, QUEUE_FULL = 5, 6, 7


def refusal(outcome: int, value: str, limits: Limits, tenant: str) -> Refused:
    """The error for a refusing outcome of the create script; `value` is the retry time or the queue count."""
    if outcome == RATE_LIMITED:
        retry = max(1, math.ceil(float(value)))  # whole seconds, rounded up: obeying it is never refused again
        return Refused(
            f"over {limits.rate_per_second:g} submissions/s (burst {limits.burst}) for tenant {tenant};"
            f" retry after {retry} s",
            code="rate_limited", retry_after_seconds=retry,
        )
    retry = limits.queue_full_retry_after_seconds
    if outcome == TENANT_FULL:
        return Refused(
            f"tenant {tenant} has {value} jobs queued, the most allowed "
            f"(BORA_MAX_QUEUED_PER_TENANT={limits.max_queued_per_tenant}); retry when some have run",
            code="tenant_queue_full", retry_after_seconds=retry,
        )
    return Refused(
        f"the queue is full ({value} jobs waiting, BORA_MAX_QUEUED_TOTAL={limits.max_queued_total}); retry later",
        code="queue_full", retry_after_seconds=retry,
    )
