"""`Idempotency-Key` on job creation: a retried POST returns the job the first one created.

Key `{prefix}:idem:{tenant}:{key}` -> JSON {body_sha256, job_id, claimed_at}, kept 24 h (never longer than the
job it names), per tenant so two tenants may use the same key. The claim is written in the same transaction
as the job and its queue entry (`jobstore.create(claim=...)`, one Lua script), so a key names a job that exists
or none at all, whatever fails in between: there is nothing to release and no claim without a job. The same
script answers a replay before the rate limit (a replay spends no token) and settles races between concurrent
requests; `lookup` is for deletion, which drops the key with its job.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis import Redis

from service.jobs.jobstore import Claim

TTL_SECONDS = 24 * 3600


def body_sha256(body: Any) -> str:
    """Fingerprint of a parsed JSON body, insensitive to key order and whitespace."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def redis_key(prefix: str, tenant: str, key: str) -> str:
    return f"{prefix}:idem:{tenant}:{key}"


def claim(prefix: str, tenant: str, key: str, body_fingerprint: str, ttl: int = TTL_SECONDS) -> Claim:
    """The claim `jobstore.create` writes with the job."""
    return Claim(redis_key(prefix, tenant, key), body_fingerprint, ttl)


def lookup(r: Redis, prefix: str, tenant: str, key: str) -> tuple[str, str] | None:
    """(job_id, body_sha256) of the job this key names, or None."""
    raw = r.get(redis_key(prefix, tenant, key))
    if raw is None:
        return None
    held = json.loads(raw)  # type: ignore[arg-type]
    return held["job_id"], held["body_sha256"]
