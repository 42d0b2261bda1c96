"""Batching: compatible queued jobs run through one pipeline call, each keeping its own run.

The job RQ hands this worker starts first; with BORA_WORKER_BATCH_SIZE > 1 the worker then claims up to that
many minus one queued jobs with the same model, shape, steps, sampler and guidance (`queueing.claim_batch`:
off RQ's queue, each started with its own run token, so the reaper recovers every one of them if this
worker dies) and generates all their videos in one call. Each sample has its own generator seeded with its
job's seed, so its frames do not depend on its batch mates (equal to its solo run up to fp32 GEMM
rounding).

Per job, as in a solo run: every state write is fenced by the job's own token; progress is written per
step; a job canceled, past its time limit, or whose write was refused drops out of the batch at once (its
state is ended then, not when the batch finishes). Its latents stay in the batch until the call ends - the
samplers' state is batch-shaped - but nothing of it is decoded into outputs, written or uploaded. Once
every job has dropped out the call stops. After the call, each job's MP4 is encoded, uploaded and marked
succeeded on its own: a failure there fails only that job. A failure of the call itself (out of memory,
non-finite latents) fails every job still in it.
"""

from __future__ import annotations

import logging
from typing import Any

from service.jobs import queueing
from service.jobs.errors import RunSuperseded
from service.jobs.schemas import WorkerState
from worker.jobs import REDIS_LOST, Runtime, VideoJobRun
from worker.limits import generation_limits

logger = logging.getLogger(__name__)


class Batch:
    """The runs of one pipeline call: the RQ job's run first, then the ones it claimed."""

    def __init__(self, rt: Runtime, first: VideoJobRun) -> None:
        self.rt = rt
        self.runs = [first]
        self.active: list[VideoJobRun] = []  # started and not yet dropped out

    def run(self) -> dict[str, Any]:
        """Start, generate, finish; returns the first run's summary (RQ's result for its job)."""
        rt, first = self.rt, self.runs[0]
        if not first.begin():
            assert first.summary is not None
            return first.summary
        self.active.append(first)
        self._claim()
        rt.current_job = first.job.job_id
        rt.metrics.busy.set(1)
        if rt.heartbeat:
            rt.heartbeat.update(state=WorkerState.busy, current_job=first.job.job_id)
        try:
            self._generate()
        finally:
            rt.current_job = None
            rt.metrics.busy.set(0)
            rt.metrics.update_gpu_memory(rt.device)
            if rt.heartbeat:
                stopping = rt.heartbeat.state == WorkerState.stopping
                rt.heartbeat.update(
                    state=WorkerState.stopping if stopping else WorkerState.ready, current_job=None
                )
        assert first.summary is not None
        return first.summary

    def _claim(self) -> None:
        """Claim and start up to BORA_WORKER_BATCH_SIZE - 1 compatible queued jobs (service/jobs/queueing.py)."""
        limit = self.rt.settings.worker_batch_size - 1
        if limit < 1:
            return
        first = self.runs[0]
        try:
            for payload in queueing.claim_batch(self.rt.redis, self.rt.settings, first.job, limit):
                run = VideoJobRun(self.rt, payload, claimed=True)
                self.runs.append(run)
                if run.begin():
                    self.active.append(run)
        except REDIS_LOST:
            raise
        except Exception:  # the first job runs whatever went wrong; a job claimed but not started is restored
            logger.warning("claiming a batch failed", extra={"job_id": first.job.job_id}, exc_info=True)
        if len(self.active) > 1:
            logger.info("batch", extra={"event": "worker.batch", "job_id": first.job.job_id,
                                        "jobs": [run.job.job_id for run in self.active]})

    def _drop(self, run: VideoJobRun, exc: Exception) -> None:
        self.active.remove(run)
        run.stop(exc)

    def _generate(self) -> None:
        from model.errors import Interrupted

        for run in list(self.active):
            try:
                run.check_model()
            except Exception as exc:  # noqa: BLE001 - fails that job only
                self._drop(run, exc)
        called = list(self.active)  # the pipeline returns one video per prompt, in this order
        if not called:
            return
        inp = called[0].job.input
        oom_streak = self.rt.consecutive_ooms
        try:
            out = self.rt.pipeline(
                [run.job.input.prompt for run in called],
                num_frames=inp.num_frames,
                height=inp.height,
                width=inp.width,
                num_inference_steps=inp.num_inference_steps,
                guidance_scale=inp.guidance_scale,
                sampler=inp.sampler,
                seed=[run.job.seed for run in called],
                callback_on_step_end=self._on_step,
                should_cancel=self._should_cancel,
                stage_callback=self._on_stage,
                limits=generation_limits(called[0].job.model),
            )
        except Interrupted as exc:
            for run in list(self.active):  # every run has dropped out, unless the pipeline stopped by itself
                self._drop(run, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the call failed: every job still in it fails with it
            for run in list(self.active):
                self._drop(run, exc)
            if self.rt.consecutive_ooms > oom_streak:  # one batch out of memory counts once
                self.rt.consecutive_ooms = oom_streak + 1
            return
        for run in self.active:
            run.close_stage()  # decoding ended for all at once, not when each one's encoding starts
        for index, run in enumerate(called):
            if run in self.active:
                run.finish(out.frames[index], int(out.token_counts[index]), bool(out.truncated[index]))

    # -- the pipeline's callbacks -------------------------------------------------------------------------

    def _should_cancel(self) -> bool:
        """Before each step: drop the runs that must stop (cancel, time limit, shutdown); stop when none is left."""
        for run in list(self.active):
            if run.should_cancel():
                self._drop(run, _interrupted(run))
        return not self.active

    def _on_stage(self, name: str) -> None:
        from model.errors import Interrupted

        for run in list(self.active):
            try:
                run.on_stage(name)
            except (RunSuperseded, Interrupted) as exc:
                self._drop(run, exc)
        if not self.active:
            raise Interrupted("every job of the batch stopped")

    def _on_step(self, pipe: Any, step_index: int, timestep: int, total: int) -> None:
        for run in list(self.active):
            try:
                run.on_step(pipe, step_index, timestep, total)
            except RunSuperseded as exc:
                self._drop(run, exc)


def _interrupted(run: VideoJobRun) -> Exception:
    from model.errors import Interrupted

    return Interrupted(f"stopped between steps ({run.interrupt_reason})")
