"""The API process: `uvicorn service.main:app` builds the app (service/api/app.py) from BORA_* settings."""

from __future__ import annotations

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
        return _app
    raise AttributeError(name)
