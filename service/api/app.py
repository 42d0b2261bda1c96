"""The FastAPI app: routers, error handlers and middleware around the job domain (service/jobs/)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from rq import Queue

from service.api import auth, handlers
from service.api.deps import Api
from service.api.metrics import ApiMetrics, MetricsMiddleware
from service.api.middleware import RequestIdMiddleware, RequestLimitsMiddleware
from service.api.routes import events, health, playground, videos, webhooks
from service.jobs import logs, reaper
from service.jobs.admission import Limits
from service.jobs.config import Settings, get_settings
from service.jobs.connection import connect, connect_async
from service.jobs.models import MODELS
from service.jobs.storage import make_storage
from service.keys import KeyStore

DESCRIPTION = """Text-to-video for biomedical prompts. Submit a job (`POST /v1/videos`, answered 202 at once),
poll `GET /v1/videos/{id}` until `status` is terminal, then fetch `GET /v1/videos/{id}/content`.
Every error is JSON: `{"error": {"type", "code", "message", "param"}}`. Videos are synthetic, AI-generated."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    redis = connect(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure_api()  # JSON lines, like the worker's, for the API's own loggers
        # Jobs of dead workers are recovered even while no worker runs (each worker runs a reaper too).
        stop_reaper = threading.Event()
        if settings.reaper_in_api:
            reaper.start(redis, settings, stop_reaper, storage=app.state.api.storage)
        yield
        stop_reaper.set()
        redis.close()
        await app.state.api.aredis.aclose()

    # /docs and /redoc with their assets served from the package, not a CDN: they work on an offline host
    app = FastAPIOffline(title="Bora video API", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    keys = KeyStore(settings.api_keys_file)  # type: ignore[arg-type]  # derived, never None
    app.state.api = Api(
        settings=settings,
        redis=redis,
        aredis=connect_async(settings),
        queue=Queue(settings.queue_name, connection=redis, default_timeout=settings.job_timeout_seconds),
        storage=make_storage(settings),
        metrics=ApiMetrics(redis, prefix=settings.key_prefix, heartbeat_ttl_seconds=settings.heartbeat_ttl_seconds),
        model_spec=MODELS[settings.model_preset],
        limits=Limits.from_settings(settings),
    )
    app.include_router(videos.router)
    app.include_router(events.router)
    app.include_router(webhooks.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    handlers.install(app)
    auth.document(app, settings)
    # Added last = outermost: metrics see every answer, including 413s from the body cap.
    app.add_middleware(RequestLimitsMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(auth.AuthMiddleware, settings=settings, keys=keys)  # 401 before the body is read
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.api.metrics)
    return app

