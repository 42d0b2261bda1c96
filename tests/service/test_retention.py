"""Retention: outputs of a job go once its record has expired and they are older than BORA_RETENTION_SECONDS,
in both storage backends (a real folder; S3 over HTTP against moto's server), counted for /metrics."""

from __future__ import annotations

import os
import secrets
import threading
import time

import pytest

from service.jobs import jobstore, reaper, retention
from service.jobs.config import Settings
from service.jobs.storage import LocalStorage, S3Storage, Storage, output_key
from tests.service.conftest import finish_like_worker, queued_record
from tests.support import wait_for

NAMES = ("video.mp4", "thumbnail.jpg", "metadata.json")


@pytest.fixture(params=["local", "s3"])
def store(request, settings) -> Storage:
    if request.param == "local":
        return LocalStorage(settings.storage_dir)
    s3 = S3Storage("bora-test-" + secrets.token_hex(4), endpoint_url=request.getfixturevalue("s3_server"),
                   access_key_id="k", secret_access_key="s")
    s3.create_bucket()
    return s3


def _write_outputs(store: Storage, job_id: str, attempts: int = 1) -> list[str]:
    keys = [output_key(job_id, name, attempt) for attempt in range(1, attempts + 1) for name in NAMES]
    for key in keys:
        store.put_bytes(key, b"x" * 10, "application/octet-stream")
    return keys


def test_sweep_deletes_outputs_of_expired_jobs_only(redis_conn, settings, store):
    prefix = settings.key_prefix
    alive = jobstore.create(redis_conn, queued_record(), prefix=prefix)[0].id  # record still there
    expired = jobstore.create(redis_conn, queued_record(), prefix=prefix, retention_seconds=1)[0].id
    alive_keys, expired_keys = _write_outputs(store, alive), _write_outputs(store, expired, attempts=2)
    never_recorded = _write_outputs(store, jobstore.new_job_id())  # e.g. written before a Redis wipe
    wait_for(lambda: not redis_conn.exists(jobstore.Keys(prefix).job(expired)), 5, "the record's TTL")

    assert retention.sweep(redis_conn, settings, store) == []  # objects younger than the retention stay
    later = time.time() + settings.job_retention_seconds + 5
    deleted = retention.sweep(redis_conn, settings, store, now=later)

    assert sorted(deleted) == sorted(expired_keys + never_recorded)
    assert not any(store.exists(key) for key in deleted)
    assert all(store.exists(key) for key in alive_keys)  # a record still names them
    assert retention.deleted_counts(redis_conn, prefix=prefix) == (len(deleted), 2)
    assert retention.sweep(redis_conn, settings, store, now=later) == []  # nothing twice
    if isinstance(store, LocalStorage):  # no empty job folders left behind
        assert sorted(p.name for p in (store.root / "videos").iterdir()) == [alive]


def test_one_sweep_per_interval_across_replicas(redis_conn, settings, store):
    job_id = jobstore.new_job_id()
    _write_outputs(store, job_id)
    replicas = [settings.model_copy(update={"job_retention_seconds": 60}) for _ in range(3)]
    if isinstance(store, LocalStorage):
        for path in (store.root / "videos").rglob("*"):
            os.utime(path, (time.time() - 120, time.time() - 120))
        results = [retention.sweep_if_due(redis_conn, s, store) for s in replicas]
        assert results[0] is not None and len(results[0]) == 3
    else:
        results = [retention.sweep_if_due(redis_conn, s, store) for s in replicas]
        assert results[0] == []  # S3 objects cannot be back-dated: too young, but the sweep ran
    assert results[1:] == [None, None]  # the others found the sweep done for this interval


def test_reaper_loop_sweeps_and_metrics_count_it(redis_conn, settings, client):
    """The reaper thread (as the API runs it) sweeps on its own; /metrics shows the deletions."""
    store = LocalStorage(settings.storage_dir)
    fast = settings.model_copy(update={"job_retention_seconds": 60, "reaper_interval_seconds": 0.05})
    job_id = jobstore.new_job_id()
    keys = _write_outputs(store, job_id)
    for key in keys:
        os.utime(store.local_path(key), (time.time() - 120, time.time() - 120))
    stop = threading.Event()
    thread = reaper.start(redis_conn, fast, stop, storage=store)
    try:
        wait_for(lambda: not any(store.exists(key) for key in keys), 10, "the retention sweep")
    finally:
        stop.set()
        thread.join(5)
    text = client.get("/metrics").text
    assert "bora_retention_deleted_objects_total 3.0" in text
    assert "bora_retention_deleted_jobs_total 1.0" in text


def test_a_succeeded_job_keeps_its_outputs_while_its_record_lives(redis_conn, settings):
    store = LocalStorage(settings.storage_dir)
    record, _ = jobstore.create(redis_conn, queued_record(), prefix=settings.key_prefix)
    done = finish_like_worker(redis_conn, settings, record.id, b"mp4")
    os.utime(store.local_path(done.outputs.video.key), (0, 0))  # however old the file
    assert retention.sweep(redis_conn, settings, store, now=time.time() + 10**9) == []
    assert store.exists(done.outputs.video.key)


def test_old_setting_name_still_works(monkeypatch):
    monkeypatch.setenv("BORA_JOB_RETENTION_SECONDS", "3600")
    assert Settings().job_retention_seconds == 3600
    monkeypatch.setenv("BORA_RETENTION_SECONDS", "7200")
    assert Settings().job_retention_seconds == 7200  # the new name wins
