"""SIGTERM: a busy worker stops taking jobs and finishes its current one within the grace period, or — with a
short grace — stops it between denoising steps and re-queues it for another worker; both exit 0. The API
drains: requests in flight when it gets SIGTERM are answered in full, and every 202'd job exists.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.faults.conftest import PREFIX, dump
from tests.support import wait_for

SLOW = {"num_frames": 16, "height": 64, "width": 64, "num_inference_steps": 100}  # a few seconds here


def busy_jobs(stack, r, *workers) -> dict[int, str] | None:
    """{pid: current job} once every worker is denoising a job."""
    current = {}
    for key in r.scan_iter(f"{PREFIX}:worker:*"):
        beat = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        if beat.get("current_job"):
            current[int(beat["pid"])] = beat["current_job"]
    if all(w.pid in current and stack.record(current[w.pid]).get("stage") == "denoising" for w in workers):
        return current
    return None


def test_sigterm_finishes_or_requeues_the_current_job(make_stack, report):
    stack = make_stack()
    stack.start_api()
    patient = stack.start_worker("patient", "--grace", "60")
    hasty = stack.start_worker("hasty", "--grace", "0.2")
    stack.wait_ready(patient, hasty)
    r = stack.redis.client()
    with httpx.Client(base_url=stack.base, timeout=5) as client:
        ids = stack.submit(client, 4, **SLOW)
        current = wait_for(lambda: busy_jobs(stack, r, patient, hasty), 60, "both workers to be busy", 0.02)
        finished, requeued = current[patient.pid], current[hasty.pid]
        patient.send_signal(signal.SIGTERM)
        hasty.send_signal(signal.SIGTERM)
        signaled = time.monotonic()

        assert hasty.wait(timeout=20) == 0, stack.log("hasty")
        hasty_s = time.monotonic() - signaled
        assert patient.wait(timeout=60) == 0, stack.log("patient")
        patient_s = time.monotonic() - signaled
        report(
            f"SIGTERM: grace 0.2 s worker exited in {hasty_s:.1f} s; grace 60 s worker in {patient_s:.1f} s"
        )

        jobs = stack.jobs(client, ids)
        assert jobs[finished]["status"] == "succeeded", dump(jobs)
        assert jobs[requeued]["status"] == "queued", dump(jobs)
        assert stack.record(requeued)["attempts"] == "1"
        # Neither took another job after the signal.
        assert sorted(j["status"] for j in jobs.values()) == ["queued", "queued", "queued", "succeeded"]

        successor = stack.start_worker("successor")
        wait_for(
            lambda: all(j["status"] == "succeeded" for j in stack.jobs(client, ids).values()),
            120,
            "the successor to run the rest",
            0.5,
        )
        assert stack.record(requeued)["attempts"] == "2"  # the re-queued job ran again, from the start
        assert successor.poll() is None


def test_api_drains_in_flight_requests(make_stack, report):
    """SIGTERM to uvicorn under load: every request it took is answered in full (202), and no job exists
    without its 202. Connections still in the listen backlog when uvicorn closes its socket are reset by the
    kernel before uvicorn ever reads them (nothing was done for them); in production the load balancer
    stops routing to the instance before the signal (e.g. a preStop delay), so none are left there.
    The queue caps are off: the one-script submission fills the default per-tenant cap (100) before the
    signal, and a 429 is not what this test is about."""
    stack = make_stack(BORA_MAX_QUEUED_PER_TENANT="0", BORA_MAX_QUEUED_TOTAL="0")
    api = stack.start_api()
    accepted: list[str] = []
    refused: list[str] = []
    other: list[str] = []
    stop = threading.Event()

    def submitter(i: int) -> None:
        # A connection per request: a keep-alive connection the server closes while idle is a client race,
        # not a failed drain.
        with httpx.Client(base_url=stack.base, timeout=5, headers={"Connection": "close"}) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    response = client.post("/v1/videos", json={"prompt": f"drain {i}-{n}", "seed": n})
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                    refused.append(type(exc).__name__)  # the socket closed: this client is done
                    return
                except httpx.TransportError as exc:  # e.g. a timeout: the drain hung
                    other.append(f"{type(exc).__name__}: {exc}")
                    return
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                else:
                    other.append(f"{response.status_code} {response.text[:200]}")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(submitter, i) for i in range(6)]
        wait_for(lambda: len(accepted) >= 30, 30, "submissions to flow")
        api.send_signal(signal.SIGTERM)
        # uvicorn drains, then re-raises the signal it caught: a clean stop reads as killed-by-SIGTERM.
        assert api.wait(timeout=15) in (0, -signal.SIGTERM), stack.log("api")
        stop.set()
        for future in futures:
            future.result()
    assert other == []
    r = stack.redis.client()
    # Every 202 is a stored, queued job, and nothing was created for a request that got no answer.
    assert all(r.exists(f"{PREFIX}:job:{job_id}") for job_id in accepted)
    assert r.zcard(f"{PREFIX}:jobs") == r.llen(f"rq:queue:{PREFIX}-videos") == len(accepted)
    report(
        f"API drain: {len(accepted)} answered 202 (all stored), {len(refused)} refused/reset unanswered, 0 lost"
    )
