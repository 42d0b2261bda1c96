"""Admission control for job submissions: a per-tenant rate limit, then per-tenant and global queue caps.

Over any limit the submission is refused with 429 and `Retry-After` (`RateLimited`), so a GPU fleet's backlog
stays bounded however clients behave. Reads (status, list, content, events) are not limited: they cost one
Redis read, and polling clients should not be starved by their own submissions.

- Rate: a token bucket per tenant (service/api/ratelimit.py), BORA_RATE_LIMIT_PER_SECOND / _BURST.
- Per-tenant cap: queued jobs of the tenant, BORA_MAX_QUEUED_PER_TENANT. Counted exactly by one Lua script
  over `{P}:tenant:{t}:pending` (ZSET id -> reserved at): it drops finished and expired jobs, counts those
  still `queued` plus fresh reservations whose job is being written, and adds the new id only under the cap.
  Running jobs stay in the set uncounted, so a job the reaper puts back in the queue counts again.
- Global cap: waiting jobs in the RQ queue (LLEN), BORA_MAX_QUEUED_TOTAL. Checked in the same script; jobs
  in flight between the check and their enqueue are not seen, so the queue can pass the cap by at most the
  number of submissions in flight at that moment.
"""

from __future__ import annotations

import contextlib
import time

from redis import Redis
from redis.exceptions import RedisError

from service.api.errors import RateLimited
from service.api.ratelimit import RateLimiter
from service.jobs.config import Settings
from service.jobs.jobstore import Keys

RESERVATION_GRACE_SECONDS = 30  # a reservation without a job hash after this long is a failed submission

_RESERVE = """
local job_prefix, job_id = ARGV[1], ARGV[2]
local now, grace = tonumber(ARGV[3]), tonumber(ARGV[4])
local tenant_cap, global_cap, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if global_cap > 0 then
  local waiting = redis.call('LLEN', KEYS[2])
  if waiting >= global_cap then return {0, 'global', waiting} end
end
if tenant_cap == 0 then return {1, '', 0} end  -- no per-tenant cap: nothing to count
local queued = 0
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local id, reserved_at = members[i], tonumber(members[i + 1])
  local status = redis.call('HGET', job_prefix .. id, 'status')
  if status == 'queued' then
    queued = queued + 1
  elseif status == false then
    if now - reserved_at < grace then queued = queued + 1 else redis.call('ZREM', KEYS[1], id) end
  elseif status == 'succeeded' or status == 'failed' or status == 'canceled' then
    redis.call('ZREM', KEYS[1], id)
  end
end
if tenant_cap > 0 and queued >= tenant_cap then return {0, 'tenant', queued} end
redis.call('ZADD', KEYS[1], now, job_id)
redis.call('EXPIRE', KEYS[1], ttl)
return {1, '', queued + 1}
"""


class Admission:
    def __init__(self, r: Redis, settings: Settings) -> None:
        self.keys = Keys(settings.key_prefix)
        self.settings = settings
        self.limiter = (
            RateLimiter(r, settings.key_prefix, settings.rate_limit_per_second, settings.rate_limit_burst)
            if settings.rate_limit_per_second > 0
            else None
        )
        self._r = r
        self._reserve = r.register_script(_RESERVE)

    def pending_key(self, tenant: str) -> str:
        return f"{self.keys.prefix}:tenant:{tenant}:pending"

    def check_rate(self, tenant: str) -> None:
        """Take one submission from the tenant's bucket, or raise 429 `rate_limited`."""
        if self.limiter is None:
            return
        decision = self.limiter.hit(tenant)
        if not decision.allowed:
            raise RateLimited(
                f"over {self.settings.rate_limit_per_second:g} submissions/s (burst {self.settings.rate_limit_burst})"
                f" for tenant {tenant}; retry after {decision.retry_after_header} s",
                headers={"Retry-After": decision.retry_after_header},
            )

    def reserve(self, tenant: str, job_id: str) -> None:
        """Count `job_id` against the caps, or raise 429 `tenant_queue_full` / `queue_full`."""
        allowed, which, count = self._reserve(
            keys=[self.pending_key(tenant), self.keys.rq_queue],
            args=[
                self.keys.job(""), job_id, time.time(), RESERVATION_GRACE_SECONDS,
                self.settings.max_queued_per_tenant, self.settings.max_queued_total,
                self.settings.job_retention_seconds,
            ],
        )
        if allowed:
            return
        retry = {"Retry-After": str(self.settings.queue_full_retry_after_seconds)}
        if which == b"tenant":
            raise RateLimited(
                f"tenant {tenant} has {count} jobs queued, the most allowed "
                f"(BORA_MAX_QUEUED_PER_TENANT={self.settings.max_queued_per_tenant}); retry when some have run",
                code="tenant_queue_full",
                headers=retry,
            )
        raise RateLimited(
            f"the queue is full ({count} jobs waiting, BORA_MAX_QUEUED_TOTAL={self.settings.max_queued_total});"
            " retry later",
            code="queue_full",
            headers=retry,
        )

    def release(self, tenant: str, job_id: str) -> None:
        """Give back a reservation whose job was not created (best effort: it expires by itself anyway)."""
        with contextlib.suppress(RedisError):
            self._r.zrem(self.pending_key(tenant), job_id)
