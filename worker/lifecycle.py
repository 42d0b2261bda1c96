"""The worker's only path to job state and to its own heartbeat.

`JobLifecycle` wraps service.jobs.jobstore's transitions for one run of one job. The run's token (set when it
starts) fences every write: a write the job store refuses raises RunSuperseded and the run stops. Each
transition also writes a structured audit log line (job id, request id, tenant, prompt sha256, params,
outcome) and, when terminal, counts the job in the worker's metrics; terminal webhooks are queued by the job
store in the transition's own transaction. `Heartbeat` publishes `P:worker:{wid}` (TTL'd) from a background thread and on every
state change, so the API's /readyz and the reaper see this worker's state.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs import heartbeats, jobstore, queueing, webhooks
from service.jobs.config import Settings
from service.jobs.errors import InvalidTransition, JobNotFound
from service.jobs.schemas import (
    JobRecord,
    JobStatus,
    JobWarning,
    Outputs,
    Stage,
    Timings,
    VideoInput,
    WorkerHeartbeat,
    WorkerState,
    utcnow,
)
from worker.errors import WorkerError
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)
# Events that are job state changes carry the full audit fields (prompt hash, params); others only the ids.
_STATE_EVENTS = frozenset(
    {"job.running", "job.succeeded", "job.failed", "job.canceled", "job.requeued", "job.skipped", "job.expired",
     "job.superseded"}
)
_LOG_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def default_worker_id() -> str:
    """`{hostname}-{pid}-{6 hex}`, new on every start. In a container the hostname is the container id and the
    pid is 1 after each restart: without the random part a restarted worker would reuse its crashed
    predecessor's id, so its heartbeat would hide the orphaned job from the reaper, and RQ would refuse the
    name while the old registration lives."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class JobLifecycle:
    """State transitions of one job, as run by this worker."""

    r: Redis
    prefix: str
    job_id: str
    worker_id: str
    metrics: WorkerMetrics
    request_id: str | None = None
    tenant: str | None = None
    input: VideoInput | None = None
    settle_seconds: float = 20.0
    token: str | None = None
    _ended: bool = field(default=False, init=False)  # this run made its terminal transition (one per run)
    _last_progress: float = field(default=0.0, init=False)
    _progress_notified: float = field(default=0.0, init=False)
    _wants_progress: bool = field(default=False, init=False)

    # -- logging ----------------------------------------------------------------------------------------

    def audit(
        self, event: str, level: int = logging.INFO, exc_info: BaseException | None = None, **fields: Any
    ) -> None:
        """One JSON log line per state change; the fields the audit trail needs are always there."""
        extra: dict[str, Any] = {
            "event": event,
            "job_id": self.job_id,
            "request_id": self.request_id,
            "tenant": self.tenant,
            "worker_id": self.worker_id,
        }
        if self.input is not None and event in _STATE_EVENTS:
            extra["prompt_sha256"] = self.input.prompt_sha256
            extra["params"] = self.input.params()
        # LogRecord attributes (message, args, name, ...) cannot be extra keys: suffix them.
        extra.update({(f"{k}_" if k in _LOG_RECORD_ATTRS else k): v for k, v in fields.items()})
        logger.log(level, event, extra=extra, exc_info=exc_info)

    # -- transitions ------------------------------------------------------------------------------------

    @property
    def actor(self) -> str:
        """Who writes: this run (its token), or before any run this worker (an invalid payload)."""
        return self.token or f"worker:{self.worker_id}"

    def start(self, weights_sha256: str | None, deadline_seconds: float = 0.0) -> JobRecord:
        """queued -> running (stage loading) under a new run token. Raises InvalidTransition if it was canceled
        or taken meanwhile, JobExpired if it waited past its expiry. `deadline_seconds`: by when the run must
        have ended (the overdue metric); 0 keeps the deadline the job was queued with."""
        run = jobstore.mark_running(
            self.r, self.job_id, self.worker_id, prefix=self.prefix, weights_sha256=weights_sha256,
            deadline_seconds=deadline_seconds,
        )
        record, self.token = run.record, run.token
        self._last_progress = 0.0
        self.audit("job.running", attempt=record.attempts, run_token=self.token)
        self._wants_progress = record.webhook is not None and "video.progress" in record.webhook.events
        self._progress_notified = 0.0
        self.notify("video.started", record)
        return record

    @property
    def attempt(self) -> int:
        return int((self.token or ":0").rsplit(":", 1)[1])

    def progress(
        self,
        stage: Stage,
        progress: float,
        step: int | None = None,
        total_steps: int | None = None,
        eta_seconds: float | None = None,
    ) -> JobStatus:
        """Record stage/step/progress (monotonic) in one round trip; returns the job's status, which is also
        the cancel poll (`canceling` = stop). Raises RunSuperseded when the job is no longer this run's."""
        self._last_progress = max(self._last_progress, min(progress, 99.0))
        status = jobstore.update_progress(
            self.r,
            self.job_id,
            stage,
            step=step,
            total_steps=total_steps,
            progress=self._last_progress,
            eta_seconds=eta_seconds,
            prefix=self.prefix,
            token=self._token(),
        )
        if step is None:
            self.audit("job.stage", stage=stage.value)
        if self._wants_progress and self._last_progress >= self._progress_notified + webhooks.PROGRESS_EVERY:
            self._progress_notified = self._last_progress
            self.notify("video.progress")
        return status

    def warn(self, warnings: list[JobWarning]) -> None:
        if warnings:
            jobstore.add_warnings(self.r, self.job_id, warnings, prefix=self.prefix, token=self._token())
            self.audit("job.warnings", warnings=[w.code for w in warnings])

    def succeed(self, outputs: Outputs, timings: Timings) -> JobRecord:
        """-> succeeded, pointing the record at this run's objects; its webhook goes in the same transaction.
        Raises RunSuperseded (or InvalidTransition) when the job is no longer this run's."""
        token = self._token()
        self._ended = True
        record = self._settle(
            lambda: jobstore.mark_succeeded(self.r, self.job_id, outputs, timings, prefix=self.prefix, token=token)
        )
        self.metrics.job_finished("succeeded", None)
        self.audit(
            "job.succeeded",
            outcome="succeeded",
            timings=timings.model_dump(exclude_none=True),
            video_sha256=outputs.video.sha256,
            video_key=outputs.video.key,
        )
        return record

    def fail(self, error: WorkerError, timings: Timings | None = None) -> JobRecord | None:
        """-> failed with the error's code. None when the job is not this run's to end any more (canceled,
        re-queued or ended by the reaper meanwhile), or when this run already ended it."""
        if self._ended:
            self.audit("job.fail_ignored", logging.WARNING, outcome="ended", code=error.code)
            return None
        self._ended = True
        try:
            record = self._settle(
                lambda: jobstore.mark_failed(
                    self.r, self.job_id, error.code, error.message, error.retryable, prefix=self.prefix,
                    token=self.token, actor=self.actor, timings=timings,
                )
            )
        except InvalidTransition as exc:
            self.audit("job.fail_ignored", logging.WARNING, outcome=exc.current, code=error.code)
            return None
        self.metrics.job_finished("failed", error.code)
        self.audit("job.failed", logging.WARNING, outcome="failed", code=error.code, error=error.message)
        return record

    def expire(self) -> JobRecord | None:
        """queued -> failed `expired`: this worker dequeued a job that waited past its expiry."""
        try:
            record = self._settle(lambda: jobstore.expire(self.r, self.job_id, prefix=self.prefix, actor=self.actor))
        except InvalidTransition:
            return None
        self.metrics.job_finished("failed", "expired")
        self.audit("job.expired", logging.WARNING, outcome="failed", code="expired")
        return record

    def cancel(self) -> JobRecord | None:
        token = self._token()
        if self._ended:
            self.audit("job.cancel_ignored", logging.WARNING, outcome="ended")
            return None
        self._ended = True
        try:
            record = self._settle(
                lambda: jobstore.mark_canceled(self.r, self.job_id, prefix=self.prefix, token=token, actor=token)
            )
        except InvalidTransition as exc:
            self.audit("job.cancel_ignored", logging.WARNING, outcome=exc.current)
            return None
        self.metrics.job_finished("canceled", "canceled")
        self.audit("job.canceled", outcome="canceled")
        return record

    def requeue(self, reason: str, settings: Settings) -> JobRecord | None:
        """running -> queued and back at the front of the RQ queue, in one transaction (this worker is
        shutting down mid-job). None when the job is no longer this run's `running` job (a client asked to
        cancel it, or it was taken over)."""
        token = self._token()
        try:
            record = self._settle(lambda: queueing.requeue(self.r, self.job_id, settings, token=token, actor=token))
        except (InvalidTransition, JobNotFound) as exc:
            self.audit("job.requeue_ignored", logging.WARNING, outcome=getattr(exc, "current", "missing"))
            return None
        self.audit(
            "job.requeued", logging.WARNING, outcome="requeued", reason=reason, attempt=record.attempts
        )
        return record

    def _token(self) -> str:
        if self.token is None:
            raise RuntimeError(f"job {self.job_id}: a run's write before the run started")
        return self.token

    def _settle(self, transition: Callable[[], JobRecord]) -> JobRecord:
        """Run a terminal transition until Redis confirms it. Each one is safe to repeat (fenced on the run,
        ALREADY when an earlier try landed), so a lost reply or a short outage does not lose a finished job;
        after `settle_seconds` the error propagates (the worker then waits for Redis and re-queues)."""
        give_up = time.monotonic() + self.settle_seconds
        delay = 0.2
        while True:
            try:
                return transition()
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() + delay > give_up:
                    raise
                self.audit("job.transition_retry", logging.WARNING, delay_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def notify(self, event: str, record: JobRecord | None = None) -> None:
        """Queue the job's webhook for `event` (if it asked for one). A failure here never fails the job."""
        try:
            record = record or jobstore.get(self.r, self.job_id, prefix=self.prefix)
            if record is not None and webhooks.enqueue_event(self.r, record, event, prefix=self.prefix):
                self.audit("job.webhook_queued", webhook_event=event)
        except Exception:
            logger.warning("webhook not queued", extra={"job_id": self.job_id, "webhook_event": event}, exc_info=True)


class Heartbeat:
    """Publishes this worker's `P:worker:{wid}` hash every `interval` s (TTL `ttl` s) and on each change."""

    def __init__(
        self,
        r: Redis,
        *,
        prefix: str,
        worker_id: str,
        interval: float = 5.0,
        ttl: int = 30,
    ) -> None:
        self.r = r
        self.prefix = prefix
        self.interval = interval
        self.ttl = ttl
        self._lock = threading.Lock()
        self._beat = WorkerHeartbeat(
            worker_id=worker_id,
            state=WorkerState.starting,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            detail=None,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def worker_id(self) -> str:
        return self._beat.worker_id

    @property
    def state(self) -> WorkerState:
        return self._beat.state

    def update(self, **fields: Any) -> None:
        """Change fields (state, current_job, model, ...) and publish at once. current_job=None clears it."""
        with self._lock:
            self._beat = self._beat.model_copy(update=fields)
        if "state" in fields:
            logger.info(
                "worker state",
                extra={
                    "event": "worker.state",
                    "worker_id": self.worker_id,
                    "state": str(fields["state"]),
                    "current_job": self._beat.current_job,
                },
            )
        self.publish()

    def publish(self) -> None:
        with self._lock:
            beat = self._beat.model_copy(update={"updated_at": utcnow()})
        try:
            heartbeats.publish(self.r, beat, prefix=self.prefix, ttl_seconds=self.ttl)
        except Exception:  # Redis down: keep beating, the next one may land
            logger.warning("heartbeat failed", extra={"worker_id": self.worker_id}, exc_info=True)

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._run, name="bora-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()

    def stop(self, remove: bool = True) -> None:
        """Stop beating; `remove` deletes the hash at once (a clean exit) instead of letting it expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
        if remove:
            try:
                heartbeats.remove(self.r, self.worker_id, prefix=self.prefix)
            except Exception:
                logger.warning("heartbeat removal failed", extra={"worker_id": self.worker_id}, exc_info=True)
