"""Per-tenant request rate limit: a token bucket kept in Redis and updated by one Lua script.

Why a token bucket: it allows a short burst (a client submitting a handful of prompts at once) while holding
the long-run rate, and its state is two numbers per tenant. Why Lua: read-refill-take-write must be atomic
across API processes, and one round trip per request is cheap. The script reads Redis's own clock (`TIME`),
so API hosts with skewed clocks share one notion of "now". The bucket key expires once it would be full
again, so idle tenants cost nothing.

Key: `{prefix}:ratelimit:{tenant}` HASH {tokens, ts}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis import Redis

_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(retry), tostring(tokens)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until the request would be allowed (0 when allowed)
    remaining: float  # tokens left after this request

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` wants whole seconds; round up so a client that obeys it is never refused again."""
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    """`rate` requests per second sustained, up to `burst` at once, per tenant."""

    def __init__(self, r: Redis, prefix: str, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate!r} burst={burst!r}")
        self.prefix, self.rate, self.burst = prefix, rate, burst
        self._script = r.register_script(_SCRIPT)

    def key(self, tenant: str) -> str:
        return f"{self.prefix}:ratelimit:{tenant}"

    def hit(self, tenant: str, cost: int = 1) -> Decision:
        """Take `cost` tokens from the tenant's bucket if it has them."""
        allowed, retry, remaining = self._script(keys=[self.key(tenant)], args=[self.rate, self.burst, cost])
        return Decision(bool(allowed), float(retry), float(remaining))
