"""A bounded chaos run: 200 jobs through the API, 2 workers, Redis behind a fault-injecting proxy that delays
replies past the client timeout, cuts connections right after forwarding a command (ambiguous commits) and
black-holes all traffic for seconds; one worker is killed -9 (and restarted), the other stopped (SIGSTOP)
past its heartbeat TTL and then resumed (a zombie). Then an invariant checker:

- every accepted job is terminal;
- every succeeded job's video, thumbnail and metadata exist and match the sha256 in its record, and are the
  objects of the run that owns the record (its attempt);
- every terminal job was audited exactly once (no stale run's terminal write was accepted);
- no object in storage that no succeeded record references (after the reaper's purge);
- no 5xx answer except 503 (Redis unreachable).
The counts are printed in pytest's summary ("fault-test figures"). Runs as its own CI stage: `make chaos`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import JOB, PREFIX
from tests.faults.proxy import FaultProxy
from tests.support import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

JOBS = 200
TERMINAL = {"succeeded", "failed", "canceled"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_chaos(make_stack, redis_server, tmp_path, report):
    rng = random.Random(9)
    proxy = FaultProxy(redis_server.port)
    stack = make_stack(
        BORA_REDIS_URL=proxy.url, BORA_HEARTBEAT_TTL_SECONDS="3", BORA_REAPER_MAX_ATTEMPTS="6",
        BORA_REAPER_QUEUED_GRACE_SECONDS="5", BORA_CANCEL_GRACE_SECONDS="10", BORA_MAX_QUEUED_PER_TENANT="0",
        BORA_MAX_QUEUED_TOTAL="0",
    )
    stack.start_api()
    workers = {"w1": stack.start_worker("w1"), "w2": stack.start_worker("w2")}
    stack.wait_ready(*workers.values())
    r = redis_server.client()

    answers: Counter[int] = Counter()
    accepted: list[str] = []
    faults: Counter[str] = Counter()

    def submit_all() -> None:
        with httpx.Client(base_url=stack.base, timeout=10) as client:
            for i in range(JOBS):
                key = f"chaos-{i}"
                for _ in range(60):
                    try:
                        response = client.post("/v1/videos", json={**JOB, "num_inference_steps": 2, "seed": i},
                                               headers={"Idempotency-Key": key})
                    except httpx.HTTPError:
                        answers[-1] += 1
                        time.sleep(0.5)
                        continue
                    answers[response.status_code] += 1
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                        break
                    time.sleep(0.5)
                if i % 10 == 9:
                    time.sleep(2.0)  # spread the submissions over the faults (~40 s: jobs run while they hit)

    def inject() -> None:
        events = ["delay", "drop_exec", "drop_eval", "blackhole"] * 3
        rng.shuffle(events)
        events[2:2], events[6:6] = ["kill"], ["zombie"]  # early, while jobs are running
        for event in events:
            time.sleep(rng.uniform(1.5, 3.0))
            faults[event] += 1
            if event == "delay":
                proxy.delay_replies(1.5)  # past the 1 s client timeout
                time.sleep(2)
                proxy.delay_replies(0)
            elif event == "drop_exec":
                proxy.drop_after(b"EXEC", 2)
            elif event == "drop_eval":
                proxy.drop_after(b"EVALSHA", 2)
            elif event == "blackhole":
                proxy.blackhole(3)
                time.sleep(3)
            elif event == "kill":
                workers["w1"].send_signal(signal.SIGKILL)
                workers["w1"].wait()
                workers["w1"] = stack.start_worker("w1b")
            elif event == "zombie":
                # whichever worker is running a job (jobs of 2 steps are short: waiting for one given worker
                # to be caught mid-job could outlast the queue)
                zombie = wait_for(lambda: next((w for w in workers.values() if busy(w.pid)), None), 60,
                                  "a worker to be running a job", interval=0.02)
                os.kill(zombie.pid, signal.SIGSTOP)
                time.sleep(6)  # twice the heartbeat TTL: its job is taken over meanwhile
                os.kill(zombie.pid, signal.SIGCONT)

    def busy(pid: int) -> bool:
        for key in r.scan_iter(f"{PREFIX}:worker:*"):
            beat = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
            if beat.get("pid") == str(pid) and beat.get("current_job"):
                return True
        return False

    submitter = threading.Thread(target=submit_all)
    injector = threading.Thread(target=inject)
    started = time.monotonic()
    submitter.start()
    injector.start()
    submitter.join()
    injector.join()
    proxy.heal()

    def statuses() -> dict[str, str]:
        pipe = r.pipeline(transaction=False)
        for job_id in accepted:
            pipe.hget(f"{PREFIX}:job:{job_id}", "status")
        return {job_id: (s or b"").decode() for job_id, s in zip(accepted, pipe.execute(), strict=True)}

    wait_for(lambda: all(s in TERMINAL for s in statuses().values()), 400, "every accepted job to end",
             interval=1)
    elapsed = time.monotonic() - started
    time.sleep(3)  # a few reaper passes: deferred deletions of superseded runs' objects
    final = statuses()
    outcome = Counter(final.values())

    # succeeded: the record's objects exist, match their sha256, and are the owning run's attempt
    storage = tmp_path / "data" / "videos"
    referenced: set[Path] = set()
    mismatches = []
    codes: Counter[str] = Counter()
    for job_id, status in final.items():
        fields = {k.decode(): v.decode() for k, v in r.hgetall(f"{PREFIX}:job:{job_id}").items()}
        if status != "succeeded":
            codes[json.loads(fields["error"])["code"]] += 1
            continue
        attempt = fields["run_token"].rsplit(":", 1)[1]
        for output in json.loads(fields["outputs"]).values():
            path = storage / output["key"]
            referenced.add(path)
            if not path.is_file() or _sha256(path) != output["sha256"] or f"/{attempt}/" not in output["key"]:
                mismatches.append((job_id, output["key"]))
    orphans = [p for p in storage.rglob("*") if p.is_file() and p not in referenced]

    # terminal audit lines: exactly one per job across the API's and the workers' logs
    terminal_events = {"job.succeeded", "job.failed", "job.canceled", "job.expired"}
    audited: Counter[str] = Counter()
    superseded = 0
    for log in tmp_path.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("event") in terminal_events and entry.get("job_id") in final:
                audited[entry["job_id"]] += 1
            superseded += entry.get("event") == "job.superseded"
    audit_problems = {job_id: audited[job_id] for job_id in final if audited[job_id] != 1}
    server_errors = {code: n for code, n in answers.items() if code >= 500 and code != 503}

    report(
        f"chaos: {len(accepted)} jobs accepted of {JOBS} in {elapsed:.0f} s; outcomes {dict(outcome)}, failure codes "
        f"{dict(codes)}; faults {dict(faults)}, proxy {dict(proxy.stats)}; answers {dict(sorted(answers.items()))} "
        f"(-1 = no answer); runs stopped as superseded {superseded}; sha256 mismatches {len(mismatches)}; "
        f"orphan objects {len(orphans)}; jobs not audited exactly once {len(audit_problems)}"
    )
    proxy.close()
    assert len(accepted) == JOBS
    assert set(outcome) <= TERMINAL
    assert not mismatches, mismatches[:5]
    assert not orphans, orphans[:5]
    assert not audit_problems, list(audit_problems.items())[:5]
    assert not server_errors, server_errors
    assert faults["kill"] == 1 and faults["zombie"] == 1
    assert superseded >= 1  # the zombie's job was taken over while it was stopped, and it noticed
