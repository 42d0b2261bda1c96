"""The API's audit trail: one log line per job state change the API or its reaper makes (created, canceled,
cancel requested; re-queued, failed or canceled after a worker was lost), with the same fields as the worker's
lines (worker/lifecycle.py): job id, tenant, request id, prompt sha256 (never the prompt), params, outcome.

The fields travel as `extra=` on logger `bora.audit`; the API process writes them as one JSON object per line
(service/jobs/logs.py, set up when the app starts).
"""

from __future__ import annotations

import logging
from typing import Any

from service.jobs.schemas import JobRecord

logger = logging.getLogger("bora.audit")
# LogRecord attributes (name, args, module, ...) cannot be `extra` keys: such fields get a `_` suffix.
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def job_fields(record: JobRecord) -> dict[str, Any]:
    """The audit fields of a job (what the worker's lines carry too)."""
    return {
        "job_id": record.id,
        "tenant": record.tenant,
        "model": record.model,
        "prompt_sha256": record.input.prompt_sha256,
        "params": record.input.params(),
    }


def audit(
    event: str, record: JobRecord, *, outcome: str, request_id: str | None, level: int = logging.INFO, **fields: Any
) -> None:
    """Write one audit line. `request_id` is this request's; the job's creating request is `job_request_id`
    when it differs (a cancel comes in a later request)."""
    line: dict[str, Any] = {"event": event, "request_id": request_id, **job_fields(record), "outcome": outcome}
    if record.request_id and record.request_id != request_id:
        line["job_request_id"] = record.request_id
    line.update(fields)
    logger.log(level, event, extra={(f"{k}_" if k in _RESERVED else k): v for k, v in line.items()})
