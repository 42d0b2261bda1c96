"""`python -m worker.main`: load the pipeline once, then run video jobs from RQ in this process.

Start-up: settings → JSON logs → metrics server → heartbeat (starting) → storage check → load the
pipeline (loading) → ready → an RQ `SimpleWorker` on `{prefix}-videos` (no fork per job: a fork after
torch has run deadlocks, and the model must stay resident).

SIGTERM/SIGINT (warm shutdown): stop taking jobs and let the current one finish; if it is still running
after `--grace` seconds (or on a second signal) it stops between denoising steps and is re-queued for
another worker. The exit code is 0 after a clean stop, 1 when start-up failed (the heartbeat then says
`failed` with the reason until its TTL runs out) or when RQ's loop ended for no reason we know of, 3 after
BORA_MAX_CONSECUTIVE_OOMS out-of-memory failures in a row (a supervisor restarts the process).

Redis outage: RQ's loop rides out an outage while idle (it retries the dequeue, every 2 s at most here); if
Redis goes away mid-job, the job stops at its next state write and the loop ends. The process then waits for
Redis (the model stays loaded), re-queues the jobs it abandoned (or fails them `worker_lost` after
`reaper_max_attempts` runs), and starts a fresh loop.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

from prometheus_client import disable_created_metrics
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker

from service.jobs import reaper
from service.jobs.config import Settings, get_settings
from service.jobs.connection import connect
from service.jobs.schemas import WorkerState
from service.jobs.storage import make_storage
from worker import jobs, logs
from worker.lifecycle import Heartbeat, default_worker_id
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
EXIT_OUT_OF_MEMORY = 3  # BORA_MAX_CONSECUTIVE_OOMS jobs in a row ran out of memory: restart me
REDIS_WAIT_LOG_S = 10.0  # while waiting for Redis to come back, log this often


class BoraWorker(SimpleWorker):
    """RQ's in-process worker, with a grace period on shutdown instead of a hard kill mid-job."""

    runtime: jobs.Runtime
    grace_s: float = DEFAULT_GRACE_S
    max_connection_wait_time = 2.0  # RQ backs off up to 60 s between reconnects; recover sooner
    stop_signaled = False
    _grace_timer: threading.Timer | None = None

    def handle_warm_shutdown_request(self) -> None:
        self.stop_signaled = True
        super().handle_warm_shutdown_request()
        rt = self.runtime
        if rt.heartbeat:
            rt.heartbeat.update(state=WorkerState.stopping, detail="shutdown requested")
        if rt.current_job and self._grace_timer is None:
            logger.info(
                "finishing current job before exit", extra={"job_id": rt.current_job, "grace_s": self.grace_s}
            )
            self._grace_timer = threading.Timer(self.grace_s, rt.shutdown.set)
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def request_force_stop(self, signum: int, frame: Any) -> None:
        """Second signal: do not kill the job mid-step; stop it at the next step and re-queue it."""
        logger.warning(
            "second stop signal: interrupting the current job", extra={"job_id": self.runtime.current_job}
        )
        self.runtime.shutdown.set()

    def register_birth(self) -> None:
        """RQ refuses a name while a registration without a death mark exists. Under our name that is a
        previous process with the same pinned BORA_WORKER_ID that crashed (ids must be unique per process);
        without this, a restarted worker would crash-loop until the stale registration expired."""
        if self.connection.exists(self.key) and not self.connection.hexists(self.key, "death"):
            logger.warning("replacing a stale RQ registration of this id", extra={"worker_id": self.name})
            self.register_death()
        super().register_birth()

    def handle_job_success(
        self, job: Any, queue: Queue, started_job_registry: Any, execution: Any = None
    ) -> None:
        """A job that re-queued itself (shutdown) returned normally, but its RQ entry is already the next
        run's: RQ must not mark it finished and set it to expire. Only this execution is cleaned up."""
        if job.id not in self.runtime.requeued:
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        self.runtime.requeued.discard(job.id)
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()

    def execute_job(self, job: Any, queue: Queue) -> None:
        super().execute_job(job, queue)
        if self.runtime.lost:  # the job lost Redis: end this loop so run() re-queues it and starts anew
            raise RedisError("Redis was lost during a job")
        if self.out_of_memory_too_often:
            logger.error(
                "out of memory on consecutive jobs: exiting for a restart",
                extra={"worker_id": self.name, "consecutive_ooms": self.runtime.consecutive_ooms},
            )
            self._stop_requested = True  # RQ's loop ends after this job; run() exits EXIT_OUT_OF_MEMORY

    @property
    def out_of_memory_too_often(self) -> bool:
        return self.runtime.consecutive_ooms >= self.runtime.settings.max_consecutive_ooms


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_runtime(
    settings: Settings, metrics: WorkerMetrics, heartbeat: Heartbeat, worker_id: str, r: Redis
) -> jobs.Runtime:
    """Check storage and load the pipeline once; raises on any start-up failure."""
    storage = make_storage(settings)
    storage.check()
    heartbeat.update(state=WorkerState.loading)
    device = resolve_device(settings.device)
    import diffusers
    import torch
    import transformers

    from model.pipeline import BoraPipeline

    # Their tqdm bars would interleave non-JSON text with our log lines.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    assert settings.model_dir is not None  # Settings derives it from data_dir and the preset
    started = time.perf_counter()
    pipeline = BoraPipeline.from_pretrained(
        settings.model_dir,
        device=device,
        text_encoder_device=None if settings.text_encoder_device == "same" else settings.text_encoder_device,
        text_encoder_dtype=getattr(torch, settings.text_encoder_dtype),
    )
    if settings.attention_broadcast == "off":
        pipeline.disable_attention_broadcast()
    elif settings.attention_broadcast != "model":
        from model.attention_broadcast import AttentionBroadcastConfig

        spatial, temporal, cross = (int(n) for n in settings.attention_broadcast.split(","))
        pipeline.enable_attention_broadcast(AttentionBroadcastConfig(spatial, temporal, cross))
    load_s = time.perf_counter() - started
    dtype = str(pipeline.dtype).removeprefix("torch.")
    metrics.model_load_seconds.set(load_s)
    metrics.set_info(pipeline.name, pipeline.weights_sha256 or "", device, dtype)
    metrics.update_gpu_memory(device)
    logger.info(
        "pipeline loaded",
        extra={
            "model": pipeline.name,
            "weights_sha256": pipeline.weights_sha256,
            "device": device,
            "dtype": dtype,
            "load_s": round(load_s, 3),
            "model_dir": str(settings.model_dir),
            "attention_broadcast": settings.attention_broadcast,
        },
    )
    return jobs.Runtime(
        pipeline=pipeline,
        redis=r,
        settings=settings,
        storage=storage,
        metrics=metrics,
        worker_id=worker_id,
        heartbeat=heartbeat,
        device=device,
        dtype=dtype,
        upload_attempts=settings.upload_attempts,
        upload_backoff_s=settings.upload_backoff_seconds,
    )


def run(
    settings: Settings, *, burst: bool = False, grace_s: float = DEFAULT_GRACE_S, log_level: str = "INFO"
) -> int:
    worker_id = settings.worker_id or default_worker_id()
    metrics = WorkerMetrics()
    state_redis = connect(settings)
    heartbeat = Heartbeat(
        state_redis,
        prefix=settings.key_prefix,
        worker_id=worker_id,
        interval=settings.heartbeat_interval_seconds,
        ttl=settings.heartbeat_ttl_seconds,
    )
    try:
        port = metrics.serve(settings.worker_metrics_port, health=lambda: unhealthy(heartbeat))
    except OSError as exc:  # most often a second worker on the host with the same port
        logger.error(
            "worker cannot serve /metrics and /healthz on port %s (%s): give each worker on a host its own "
            "BORA_WORKER_METRICS_PORT, or 0 to turn the endpoint off", settings.worker_metrics_port, exc.strerror,
            extra={"worker_id": worker_id},
        )
        return 2
    heartbeat.start()
    logger.info(
        "worker starting", extra={"worker_id": worker_id, "metrics_port": port, "queue": settings.queue_name}
    )
    try:
        rt = load_runtime(settings, metrics, heartbeat, worker_id, state_redis)
    except Exception as exc:
        logger.exception("worker start-up failed", extra={"worker_id": worker_id})
        heartbeat.update(
            state=WorkerState.failed, detail=f"start-up failed: {type(exc).__name__}: {exc}"[:500]
        )
        heartbeat.stop(remove=False)  # leave the `failed` heartbeat to expire so /readyz can say why
        return 1
    jobs.install(rt)
    heartbeat.update(
        state=WorkerState.ready,
        model=rt.pipeline.name,
        weights_sha256=rt.pipeline.weights_sha256,
        device=rt.device,
        dtype=rt.dtype,
    )
    reclaim(rt)
    # RQ blocks on the queue: its connection must not time out while idle.
    rq_redis = connect(settings, socket_timeout=None)
    stop_reaper = threading.Event()
    reaper.start(state_redis, settings, stop_reaper, storage=rt.storage)
    status = 0
    try:
        while True:
            worker = BoraWorker(
                [Queue(settings.queue_name, connection=rq_redis)], connection=rq_redis, name=worker_id
            )
            worker.runtime = rt
            worker.grace_s = grace_s
            redis_lost = False
            try:
                worker.work(burst=burst, logging_level=log_level)
            except RedisError:  # RQ's teardown could not reach Redis either
                redis_lost = True
            if worker.out_of_memory_too_often:
                status = EXIT_OUT_OF_MEMORY
                break
            if worker.stop_signaled or rt.shutdown.is_set() or (burst and not (redis_lost or rt.lost)):
                break
            if not (redis_lost or rt.lost):
                logger.error("the RQ loop ended unexpectedly; exiting", extra={"worker_id": worker_id})
                status = 1
                break
            logger.error("lost Redis; waiting for it", extra={"worker_id": worker_id, "lost_jobs": rt.lost})
            if not recover(rt, worker):
                break  # told to stop while waiting
    finally:
        stop_reaper.set()
        heartbeat.update(state=WorkerState.stopping)
        heartbeat.stop(remove=True)
        jobs.install(None)
        logger.info("worker stopped", extra={"worker_id": worker_id, "status": status})
    return status


def unhealthy(heartbeat: Heartbeat) -> str | None:
    """For /healthz: None while the worker takes jobs (ready or busy), else why not."""
    if heartbeat.state in (WorkerState.ready, WorkerState.busy):
        return None
    return f"worker is {heartbeat.state.value}"


def reclaim(rt: jobs.Runtime) -> None:
    """Before the first job: one reaper pass that also treats jobs `running` under our own id as orphans.
    Such jobs belong to a previous process with the same pinned BORA_WORKER_ID (restarted after a crash,
    possibly before its heartbeat expired); this process has run nothing yet. The pass also recovers other
    dead workers' jobs now rather than after the first reaper interval."""
    try:
        done = reaper.reap(rt.redis, rt.settings, dead_worker=rt.worker_id)
    except RedisError:  # Redis down at start: the reaper thread's passes cover other workers' jobs
        logger.warning("start-up reaper pass failed", extra={"worker_id": rt.worker_id}, exc_info=True)
        return
    if done:
        logger.warning("recovered orphaned jobs at start", extra={"worker_id": rt.worker_id, "jobs": done})


def recover(rt: jobs.Runtime, worker: BoraWorker) -> bool:
    """After RQ's loop lost Redis: wait until Redis answers, then re-queue the jobs this worker abandoned
    (reaper rules: re-queue, or `worker_lost` after max attempts) and clear RQ's stale entries for it.
    True when done; False when SIGTERM/SIGINT arrived meanwhile (the other reapers then handle the jobs)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    waited = 0.0
    try:
        while not stop.is_set():
            try:
                rt.redis.ping()
                try:
                    worker.unsubscribe()
                except RedisError:
                    pass
                worker.register_death()  # else RQ refuses a new loop under this name ("active worker")
                done = reaper.reap(rt.redis, rt.settings, dead_worker=rt.worker_id, job_ids=rt.lost)
                logger.warning(
                    "Redis is back", extra={"worker_id": rt.worker_id, "jobs": done, "waited_s": waited}
                )
                rt.lost.clear()
                return True
            except RedisError:
                stop.wait(0.5)
                waited += 0.5
                if waited % REDIS_WAIT_LOG_S == 0:
                    logger.warning("still waiting for Redis", extra={"waited_s": waited})
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.main", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help="seconds a running job may take to finish after SIGTERM before it is re-queued",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    disable_created_metrics()
    return run(get_settings(), burst=args.burst, grace_s=args.grace, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
