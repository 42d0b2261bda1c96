"""Failure 8: out of memory. The failed step's tensors must be unreachable before the device cache is emptied,
and a worker that keeps running out of memory exits non-zero for its supervisor to restart it."""

from __future__ import annotations

import signal
import weakref
from typing import Any

import torch

from service.jobs.schemas import JobStatus
from service.jobs.storage import LocalStorage
from worker import main
from worker.main import EXIT_OUT_OF_MEMORY


class OutOfMemoryPipeline:
    """The real pipeline's attributes; calling it allocates "activations" in a frame, then runs out of memory."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.activations: list[weakref.ref] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, prompt, **kwargs):
        kwargs["stage_callback"]("encoding_text")
        return self._forward()

    def _forward(self):
        hidden = torch.ones(256, 1024)  # what a failed forward leaves on its frame
        self.activations.append(weakref.ref(hidden))
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_oom_frees_the_failed_steps_tensors_before_emptying_the_cache(env, make_runtime, tiny_pipeline,
                                                                      monkeypatch):
    pipeline = OutOfMemoryPipeline(tiny_pipeline)
    runtime = make_runtime(pipeline, LocalStorage(env.settings.storage_dir))
    runtime.device = "cuda"  # the path that empties the device cache; the cache call is observed below
    alive_at_empty_cache: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_at_empty_cache.append(
        pipeline.activations[-1]() is not None))
    payload, record = env.run_one(runtime)
    assert record.status == JobStatus.failed and record.error.code == "out_of_memory"
    assert alive_at_empty_cache == [False], "the failed step's tensor was still referenced at empty_cache()"
    assert runtime.consecutive_ooms == 1


def test_a_worker_out_of_memory_n_times_in_a_row_exits_non_zero(env, tiny_model_dir, monkeypatch):
    settings = env.settings.model_copy(update={
        "model_preset": "tiny", "model_dir": tiny_model_dir, "device": "cpu", "max_consecutive_ooms": 2,
        "reaper_interval_seconds": 3600.0,
    })
    real_load = main.load_runtime

    def load_failing(*args: Any, **kwargs: Any):
        rt = real_load(*args, **kwargs)
        rt.pipeline = OutOfMemoryPipeline(rt.pipeline)
        return rt

    monkeypatch.setattr(main, "load_runtime", load_failing)
    jobs = [env.submit() for _ in range(3)]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = main.run(settings, burst=True, grace_s=5)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert status == EXIT_OUT_OF_MEMORY
    codes = [env.record(p.job_id).error.code if env.record(p.job_id).error else None for p in jobs]
    assert codes == ["out_of_memory", "out_of_memory", None]  # stopped after two: the third waits for a restart
    assert env.record(jobs[2].job_id).status == JobStatus.queued
