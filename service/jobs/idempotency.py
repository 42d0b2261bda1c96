"""`Idempotency-Key` on job creation: a retried POST returns the job the first one created.

Key `{prefix}:idem:{tenant}:{key}` -> JSON {body_sha256, job_id}, set with NX and a 24 h TTL, per tenant so
two tenants may use the same key. The route claims the key *before* creating the job, with the id it is about
to use; whoever wins the SET NX creates the job, everyone else gets that job's id back (or a conflict if
their body differs). If creating the job then fails, the route calls `release` so a retry can succeed.

A second request can arrive after the claim but before the job exists; `jobstore.get` then returns None and
the route should answer 409 (`idempotency_key_in_use`, retry shortly) rather than 404. A claim whose job never
appeared (its request died with Redis, say, before it could `release`) is `abandoned` after a grace period, and
the route may then release it and claim the key afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from redis import Redis

TTL_SECONDS = 24 * 3600

_RELEASE = """
local value = redis.call('GET', KEYS[1])
if value and cjson.decode(value)['job_id'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def body_sha256(body: Any) -> str:
    """Fingerprint of a parsed JSON body, insensitive to key order and whitespace."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _key(prefix: str, tenant: str, key: str) -> str:
    return f"{prefix}:idem:{tenant}:{key}"


def claim(
    r: Redis, prefix: str, tenant: str, key: str, body_sha256: str, job_id: str, ttl: int = TTL_SECONDS
) -> tuple[str | None, bool]:
    """(None, False): claimed, go create `job_id`. (existing_id, False): replay, return that job.
    (existing_id, True): the key was used with another body -> 409."""
    rkey = _key(prefix, tenant, key)
    value = json.dumps({"body_sha256": body_sha256, "job_id": job_id, "claimed_at": time.time()})
    for _ in range(3):  # the holder may expire or be released between SET NX and GET
        if r.set(rkey, value, nx=True, ex=ttl):
            return None, False
        existing = r.get(rkey)
        if existing is not None:
            held = json.loads(existing)
            return held["job_id"], held["body_sha256"] != body_sha256
    raise RuntimeError(f"idempotency key {key!r} kept changing under us")


def release(r: Redis, prefix: str, tenant: str, key: str, job_id: str) -> bool:
    """Drop the claim if it still names `job_id` (job creation failed); never drops someone else's claim."""
    return bool(r.eval(_RELEASE, 1, _key(prefix, tenant, key), job_id))


def abandoned(r: Redis, prefix: str, tenant: str, key: str, job_id: str, grace_seconds: float) -> bool:
    """True when the claim still names `job_id` and is older than `grace_seconds`: call it only once you know
    `job_id` does not exist, i.e. the request that claimed the key died before creating its job."""
    value = r.get(_key(prefix, tenant, key))
    if value is None:
        return False
    held = json.loads(value)
    return bool(held["job_id"] == job_id and time.time() - float(held.get("claimed_at", 0)) > grace_seconds)
