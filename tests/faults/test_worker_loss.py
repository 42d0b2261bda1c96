"""`kill -9` of a worker in the middle of jobs: no job is lost, none stays `running`.

Two worker processes share ≥20 jobs submitted over HTTP; one is killed (SIGKILL) while it denoises. Its
heartbeat expires (TTL 2 s here), a reaper (API or surviving worker, every 1 s) re-queues the job at the
front, and the other worker completes it. Every job ends `succeeded` (or `failed`/`worker_lost` after its
attempts), within a bounded time.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from rq.registry import StartedJobRegistry

from tests.faults.conftest import PREFIX, dump, error_of
from tests.support import wait_for

N_JOBS = 20
LONG = {"num_frames": 16, "height": 64, "width": 64, "num_inference_steps": 40}  # ~1 s per job here


def test_kill_9_mid_job_loses_nothing(make_stack, tmp_path, report):
    stack = make_stack()
    stack.start_api()
    victim, survivor = stack.start_worker("w1"), stack.start_worker("w2")
    stack.wait_ready(victim, survivor)
    r = stack.redis.client()

    with httpx.Client(base_url=stack.base, timeout=5) as client:
        ids = stack.submit(client, N_JOBS, **LONG)

        def victim_denoising() -> str | None:
            for key in r.scan_iter(f"{PREFIX}:worker:*"):
                beat = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
                job_id = beat.get("current_job")
                if beat.get("pid") == str(victim.pid) and job_id:
                    record = stack.record(job_id)
                    if record.get("stage") == "denoising" and int(record.get("step") or 0) >= 2:
                        return job_id
            return None

        lost_job = wait_for(victim_denoising, 60, "the victim to be mid-job", interval=0.02)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(timeout=10)
        assert stack.record(lost_job)["status"] == "running"  # as the dead worker left it

        requeued = wait_for(
            lambda: stack.record(lost_job)["status"] != "running" and time.monotonic(), 30, "the reaper"
        )
        done = wait_for(
            lambda: stack.record(lost_job)["status"] == "succeeded" and time.monotonic(), 60, "the re-run"
        )
        report(
            f"kill -9: the killed worker's job was re-queued {requeued - killed_at:.1f} s after the kill "
            f"and succeeded {done - killed_at:.1f} s after it"
        )

        jobs = wait_for(lambda: stack.ended(client, ids), 120, "every job to end", interval=0.5)

    assert survivor.poll() is None, stack.log("w2")
    statuses = {job_id: (job["status"], error_of(job)) for job_id, job in jobs.items()}
    assert all(s in (("succeeded", None), ("failed", "worker_lost")) for s in statuses.values()), dump(jobs)
    assert statuses[lost_job] == ("succeeded", None)
    assert stack.record(lost_job)["attempts"] == "2"
    succeeded = sum(s == ("succeeded", None) for s in statuses.values())
    report(f"kill -9: {succeeded}/{N_JOBS} jobs succeeded, {N_JOBS - succeeded} failed worker_lost, 0 lost")

    # Outputs are whole and nothing half-written is left in local storage (tmp file + os.replace).
    storage = tmp_path / "data" / "videos"
    for job in jobs.values():
        if job["status"] == "succeeded":
            video = storage / job["outputs"]["video"]["key"]
            assert video.stat().st_size == job["outputs"]["video"]["bytes"]
    leftovers = [p for p in storage.rglob("*") if p.name.startswith(".") or p.suffix in (".part", ".tmp")]
    assert leftovers == []
    started = StartedJobRegistry(f"{PREFIX}-videos", connection=r).get_job_ids(cleanup=False)
    assert [job_id for job_id in started if stack.record(job_id)["status"] == "running"] == []


@pytest.mark.slow
def test_kill_9_mid_batch_leaves_every_claimed_job_to_the_reaper(make_stack, report):
    """A worker batching 3 jobs (the one RQ gave it and 2 it claimed off the queue) is killed mid-denoising:
    each of the 3 is `running` under its own run token of the dead worker, the reaper re-queues every one,
    and another worker completes them."""
    stack = make_stack(BORA_WORKER_BATCH_SIZE="3")
    stack.start_api()
    r = stack.redis.client()
    with httpx.Client(base_url=stack.base, timeout=5) as client:
        ids = stack.submit(client, 3, **LONG)
        victim = stack.start_worker("w1")
        stack.wait_ready(victim)

        def batch_denoising() -> bool:
            records = [stack.record(job_id) for job_id in ids]
            return all(rec.get("status") == "running" and rec.get("stage") == "denoising"
                       and int(rec.get("step") or 0) >= 2 for rec in records)

        wait_for(batch_denoising, 60, "the victim to be mid-batch", interval=0.02)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(timeout=10)
        records = [stack.record(job_id) for job_id in ids]
        assert len({rec["worker_id"] for rec in records}) == 1  # one worker ran all three
        assert [rec["run_token"].rsplit(":", 1)[1] for rec in records] == ["1", "1", "1"]
        assert r.llen(f"rq:queue:{PREFIX}-videos") == 0  # the two claimed jobs left the queue

        requeued = wait_for(
            lambda: all(stack.record(job_id)["status"] != "running" for job_id in ids) and time.monotonic(),
            30, "the reaper",
        )
        survivor = stack.start_worker("w2")
        jobs = wait_for(lambda: stack.ended(client, ids), 120, "every job to end", interval=0.5)
        report(f"kill -9 mid-batch: all 3 batched jobs re-queued {requeued - killed_at:.1f} s after the kill")

    assert survivor.poll() is None, stack.log("w2")
    assert {job["status"] for job in jobs.values()} == {"succeeded"}, dump(jobs)
    assert [stack.record(job_id)["attempts"] for job_id in ids] == ["2", "2", "2"]
