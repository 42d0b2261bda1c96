"""SSE helpers, driven by a job getter over an in-memory list of snapshots and a fake clock."""

from __future__ import annotations

import asyncio
import json

from service.api.events import (
    KEEPALIVE,
    ajob_event_stream,
    event_id_of,
    format_sse,
    job_event_stream,
    parse_last_event_id,
)


def snapshot(n, status, stage, progress):
    return {"id": "j1", "status": status, "stage": stage, "progress": progress,
            "created_at": "2025-01-01T00:00:00+00:00", "updated_at": f"2025-01-01T00:00:{n:02d}+00:00"}


HISTORY = [
    snapshot(0, "queued", "queued", 0.0),
    snapshot(0, "queued", "queued", 0.0),  # unchanged poll: no event
    snapshot(1, "running", "loading", 0.0),
    snapshot(2, "running", "denoising", 10.0),
    snapshot(3, "running", "denoising", 50.0),
    snapshot(3, "running", "denoising", 50.0),
    snapshot(4, "succeeded", "uploading", 100.0),
    snapshot(4, "succeeded", "uploading", 100.0),  # never read: the stream ends at the terminal state
]


class Replay:
    """get_job over a list: each call returns the next snapshot (the last one repeats)."""

    def __init__(self, history):
        self.history, self.calls = history, 0

    def __call__(self, job_id):
        assert job_id == "j1"
        item = self.history[min(self.calls, len(self.history) - 1)]
        self.calls += 1
        return item


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def parse(messages):
    events = []
    for message in messages:
        if message == KEEPALIVE:
            events.append("keepalive")
            continue
        fields = dict(line.split(": ", 1) for line in message.strip().split("\n"))
        events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return events


def run(history, **kwargs):
    t = FakeTime()
    getter = Replay(history)
    out = list(job_event_stream(getter, "j1", clock=t.clock, sleep=t.sleep, **kwargs))
    return parse(out), getter


def test_format_sse():
    assert format_sse(7, "job", '{"a":1}') == 'id: 7\nevent: job\ndata: {"a":1}\n\n'
    assert format_sse(1, "x", "a\nb", retry_ms=3000) == "retry: 3000\nid: 1\nevent: x\ndata: a\ndata: b\n\n"
    assert KEEPALIVE.startswith(":") and KEEPALIVE.endswith("\n\n")


def test_one_event_per_change_with_increasing_ids_ending_at_terminal():
    events, getter = run(HISTORY, poll_interval=1, keepalive_interval=100)
    states = [(e[2]["status"], e[2]["stage"], e[2]["progress"]) for e in events]
    assert states == [("queued", "queued", 0.0), ("running", "loading", 0.0), ("running", "denoising", 10.0),
                      ("running", "denoising", 50.0), ("succeeded", "uploading", 100.0)]
    ids = [e[0] for e in events]
    assert ids == sorted(set(ids)) and ids[0] == event_id_of(HISTORY[0])
    assert getter.calls == 7


def test_resume_after_last_event_id_skips_what_the_client_saw():
    events, _ = run(HISTORY, poll_interval=1, keepalive_interval=100)
    seen = events[2][0]  # the client got up to "denoising 10%" then dropped
    resumed, _ = run(HISTORY[3:], last_event_id=seen, poll_interval=1, keepalive_interval=100)
    assert [e[2]["progress"] for e in resumed] == [50.0, 100.0]
    # Reconnecting at the current state sends nothing new until it changes.
    again, _ = run(HISTORY[4:], last_event_id=events[3][0], poll_interval=1, keepalive_interval=100)
    assert [e[2]["status"] for e in again] == ["succeeded"]
    # A terminal job the client has fully seen: the stream ends at once, empty.
    done, _ = run(HISTORY[6:], last_event_id=events[4][0])
    assert done == []


def test_keepalive_while_nothing_changes_and_max_seconds_bounds_the_stream():
    events, _ = run([HISTORY[2]], poll_interval=1, keepalive_interval=5, max_seconds=12)
    assert events[0][1] == "job" and events[1:] == ["keepalive", "keepalive"]


def test_ids_stay_increasing_with_a_clock_that_goes_back():
    history = [snapshot(5, "running", "denoising", 10.0), snapshot(3, "running", "denoising", 20.0),
               {**snapshot(3, "failed", "denoising", 20.0), "version": 1}]
    ids = [e[0] for e in run(history, poll_interval=1)[0]]
    assert ids[0] < ids[1] < ids[2]


def test_version_field_wins_and_bad_last_event_id_is_ignored():
    assert event_id_of({"version": 42, "updated_at": "2025-01-01T00:00:00+00:00"}) == 42
    assert parse_last_event_id("17") == 17
    assert parse_last_event_id(None) is None and parse_last_event_id("abc") is None


def test_job_gone_ends_the_stream():
    events, _ = run([HISTORY[2], None], poll_interval=1)
    assert len(events) == 1


def test_async_stream_matches_sync():
    async def collect():
        return [m async for m in ajob_event_stream(Replay(HISTORY), "j1", poll_interval=0.001)]

    assert [e[2] for e in parse(asyncio.run(collect()))] == [e[2] for e in run(HISTORY, poll_interval=1)[0]]
