"""One JSON object per log line: message, level, logger, and every `extra=` field.

Callers log with `logger.info("job running", extra={"job_id": ..., "request_id": ...})`. The worker and the
webhook sender own their processes and send every logger there (`configure`); the API runs inside uvicorn,
whose own loggers keep their format, so it sends only ours (`configure_api`).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str = "INFO") -> None:
    """Send every logger to stderr as JSON lines (each process's entry point calls this once)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


API_LOGGERS = ("service", "bora", "worker")  # `bora.audit`, and the worker's modules the API imports


def configure_api(level: str = "INFO", loggers: tuple[str, ...] = API_LOGGERS) -> bool:
    """Send our loggers to stderr as JSON lines, unless the process configured logging itself (the root logger
    has handlers: an embedding app, or pytest, whose caplog then sees every record). Idempotent; the loggers
    still propagate. Returns whether it attached handlers."""
    if logging.getLogger().handlers:
        return False
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JsonFormatter())
            logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
    return True
