"""The API's audit trail: one JSON log line per job state change the API makes (created, canceled, cancel
requested), with the same fields as the worker's lines (worker/lifecycle.py): job id, tenant, request id,
prompt sha256 (never the prompt), params, outcome.

The line is the JSON object itself (the log message), so it stays one parseable line whatever formatter the
process has. Under uvicorn nothing configures the root logger, so the first line attaches a plain stderr
handler to this logger; where logging is configured (tests, an embedding app) lines go there instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from typing import Any

from service.schemas import JobRecord, utcnow

logger = logging.getLogger("bora.audit")


def _ensure_handler() -> None:
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def job_fields(record: JobRecord) -> dict[str, Any]:
    """The audit fields of a job (what the worker's lines carry too)."""
    return {
        "job_id": record.id,
        "tenant": record.tenant,
        "model": record.model,
        "prompt_sha256": hashlib.sha256(record.input.prompt.encode()).hexdigest(),
        "params": record.input.model_dump(exclude={"prompt"}),
    }


def audit(event: str, record: JobRecord, *, outcome: str, request_id: str | None, **fields: Any) -> None:
    """Write one audit line. `request_id` is this request's; the job's creating request is `job_request_id`
    when it differs (a cancel comes in a later request)."""
    _ensure_handler()
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    line: dict[str, Any] = {
        "ts": utcnow().isoformat(timespec="milliseconds"),
        "level": "info",
        "logger": logger.name,
        "event": event,
        "request_id": request_id,
        **job_fields(record),
        "outcome": outcome,
    }
    if record.request_id and record.request_id != request_id:
        line["job_request_id"] = record.request_id
    line.update(fields)
    logger.info(json.dumps(line, default=str, ensure_ascii=False))
