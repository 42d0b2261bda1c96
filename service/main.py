"""The API process: `uvicorn service.main:app` builds the app (service/api/app.py) from BORA_* settings."""

from __future__ import annotations

import gc
from typing import Any

from fastapi import FastAPI

from service.api.app import create_app
from service.keys import KeyFileError

_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    """`service.main.app`, built lazily so importing this module reads no settings."""
    global _app
    if name == "app":
        if _app is None:
            try:
                _app = create_app()
            except KeyFileError as error:  # a start-up refusal with its reason, not a traceback
                raise SystemExit(f"bora API: {error}") from None
            # What imports and start-up built (~90k objects) lives as long as the process: out of the cyclic
            # collector's full passes, which otherwise walk it all (~80 ms on our CPUs, a stall every request
            # in flight then sees: the API's p99).
            gc.freeze()
        return _app
    raise AttributeError(name)
