"""A job stopped by a shutdown past the grace period re-queues itself: job state and RQ entry in one
transaction, and RQ's end-of-job bookkeeping leaves the new entry alone (not `finished`, no expiry), so the
job runs again, from the start, on the next worker — however long it waits in the queue.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry

from service.jobs import jobstore, queueing
from service.jobs.schemas import JobStatus
from service.jobs.storage import LocalStorage
from worker import jobs
from worker.main import BoraWorker


class ShutdownAtFirstStep:
    """The real pipeline; after its first denoising step the grace period runs out (as if SIGTERM came)."""

    def __init__(self, pipe: Any, rt_holder: dict[str, jobs.Runtime]) -> None:
        self._pipe, self._holder = pipe, rt_holder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, prompt: str, **kwargs: Any) -> Any:
        inner = kwargs["callback_on_step_end"]

        def callback(pipe: Any, step_index: int, timestep: int, total: int) -> None:
            inner(pipe, step_index, timestep, total)
            self._holder["rt"].shutdown.set()

        kwargs["callback_on_step_end"] = callback
        return self._pipe(prompt, **kwargs)


def work_one(env, rt: jobs.Runtime) -> None:
    """One job on the production RQ worker class, in this process."""
    worker = BoraWorker([env.queue], connection=env.r, name=f"{env.prefix}-w")
    worker.runtime = rt
    jobs.install(rt)
    try:
        worker.work(burst=True, max_jobs=1)
    finally:
        jobs.install(None)


def test_shutdown_past_grace_requeues_in_one_step(env, make_runtime, tiny_pipeline):
    holder: dict[str, jobs.Runtime] = {}
    rt = make_runtime(ShutdownAtFirstStep(tiny_pipeline, holder), LocalStorage(env.settings.storage_dir))
    holder["rt"] = rt
    payload = env.submit(num_inference_steps=4)
    work_one(env, rt)

    record = env.record(payload.job_id)
    assert record.status == JobStatus.queued and record.attempts == 1 and record.worker_id is None
    assert record.queue_position == 1
    rq_job = Job.fetch(payload.job_id, connection=env.r)
    assert rq_job.get_status() == RQStatus.QUEUED
    assert env.r.ttl(rq_job.key) == -1, "RQ set the re-queued entry to expire"
    assert StartedJobRegistry(env.settings.queue_name, connection=env.r).get_job_ids() == []
    assert rt.requeued == set()

    rt.shutdown.clear()
    rt.pipeline = tiny_pipeline
    work_one(env, rt)
    record = env.record(payload.job_id)
    assert record.status == JobStatus.succeeded and record.attempts == 2


def test_a_job_canceled_during_the_shutdown_ends_canceled(env, make_runtime, tiny_pipeline, monkeypatch):
    """A cancel that lands between the shutdown and the re-queue wins: the client asked the job to stop."""
    holder: dict[str, jobs.Runtime] = {}
    rt = make_runtime(ShutdownAtFirstStep(tiny_pipeline, holder), LocalStorage(env.settings.storage_dir))
    holder["rt"] = rt
    payload = env.submit(num_inference_steps=4)
    real_requeue = queueing.requeue

    def cancel_first(r: Any, job_id: str, settings: Any, **kwargs: Any) -> Any:
        jobstore.request_cancel(r, job_id, prefix=settings.key_prefix)
        return real_requeue(r, job_id, settings, **kwargs)

    monkeypatch.setattr(queueing, "requeue", cancel_first)
    work_one(env, rt)
    record = env.record(payload.job_id)
    assert record.status == JobStatus.canceled and record.attempts == 1, record
    assert env.r.lpos(f"rq:queue:{env.settings.queue_name}", payload.job_id) is None
    assert rt.requeued == set()
