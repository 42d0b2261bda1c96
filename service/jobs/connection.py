"""The Redis client every process builds from settings: short timeouts, so an outage fails fast (503)."""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.jobs.config import Settings

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_FROM_SETTINGS = -1.0


def redis_url(settings: Settings) -> str:
    return settings.redis_url or DEFAULT_REDIS_URL


def connect(settings: Settings, *, socket_timeout: float | None = _FROM_SETTINGS) -> Redis:
    """A pooled client. Connecting is bounded by settings.redis_timeout_seconds; so is every read unless
    `socket_timeout` says otherwise (None = wait forever, e.g. for an RQ worker blocking on the queue).
    One quick retry, no backoff."""
    timeout = settings.redis_timeout_seconds
    return Redis.from_url(
        redis_url(settings),
        socket_timeout=timeout if socket_timeout == _FROM_SETTINGS else socket_timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def connect_async(settings: Settings) -> AsyncRedis:
    """The asyncio twin of `connect` (same timeouts and retry), for the API's hot routes: a request that waits
    on Redis then holds no thread and never blocks the event loop."""
    timeout = settings.redis_timeout_seconds
    return AsyncRedis.from_url(
        redis_url(settings),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=AsyncRetry(NoBackoff(), 1),
        health_check_interval=30,
    )
