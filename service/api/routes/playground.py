"""The web playground: `/` serves a single page (service/api/playground/: plain HTML, CSS and JavaScript, no CDN,
no build step) that drives the public API from the browser with the user's own API key.

Outside `/v1`, so these routes need no key: the page holds none until the user types it (kept in the tab's
sessionStorage, sent only as an `Authorization` header). `/playground/model.json` gives the form the served
model's bounds and defaults, which the OpenAPI schema cannot: it states the widest bounds any model accepts.
A strict Content-Security-Policy keeps the page to this origin (plus the object store, whose presigned URLs
the content route redirects to).
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from service.api.errors import NotFound

router = APIRouter(include_in_schema=False)
STATIC_DIR = Path(str(files("service.api") / "playground"))
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml"}


def _headers(request: Request) -> dict[str, str]:
    settings = request.app.state.api.settings
    store = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if settings.storage == "s3":
        parts = urlsplit(store) if store else None
        store_origin = f"{parts.scheme}://{parts.netloc}" if parts else "https://*.amazonaws.com"
    else:
        store_origin = ""
    csp = (f"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' {store_origin}; "
           f"img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
           f"frame-ancestors 'none'")
    return {"Content-Security-Policy": " ".join(csp.split()), "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@router.get("/")
def index(request: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=_headers(request))


@router.get("/playground/model.json")
def served_model(request: Request) -> JSONResponse:
    """The served model's request bounds and defaults (service/jobs/models.py), and whether a key is needed."""
    spec: Any = request.app.state.api.model_spec
    settings = request.app.state.api.settings
    frames, height, width = spec.trained
    body = {
        **dataclasses.asdict(spec),
        "defaults": {"num_frames": frames, "height": height, "width": width, "fps": spec.fps,
                     "num_inference_steps": spec.default_steps, "guidance_scale": spec.default_guidance,
                     "sampler": spec.default_sampler},
        "size_multiple": 16,
        "max_prompt_chars": settings.max_prompt_chars,
        "auth_required": settings.auth == "required",
    }
    return JSONResponse(body, headers={"Cache-Control": "no-cache"})


@router.get("/playground/{name}")
def static_file(name: str, request: Request) -> FileResponse:
    path = STATIC_DIR / name
    media_type = MEDIA_TYPES.get(path.suffix)
    if media_type is None or "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"no playground file {name}", code="route_not_found")
    return FileResponse(path, media_type=media_type, headers=_headers(request))
