"""`/v1/videos` against real Redis through the app (TestClient): submit, validate, read, list, cancel."""

from __future__ import annotations

import hashlib

import pytest
from rq import Queue
from rq.job import Job

from service.jobs import jobstore
from tests.service.conftest import TENANT, queued_record

BOUND_CASES = [
    # (field overrides, failing param)
    ({"prompt": ""}, "body.prompt"),
    ({"prompt": "   "}, "body.prompt"),
    ({"prompt": "x" * 2001}, "body.prompt"),
    ({"prompt": 5}, "body.prompt"),
    ({"num_frames": 0}, "body.num_frames"),
    ({"num_frames": 33}, "body.num_frames"),  # tiny allows 1..32
    ({"num_frames": 65}, "body.num_frames"),
    ({"num_frames": 1.5}, "body.num_frames"),
    ({"num_frames": "16"}, "body.num_frames"),
    ({"num_frames": True}, "body.num_frames"),
    ({"height": 50}, "body.height"),  # not a multiple of 16
    ({"height": 16}, "body.height"),  # under tiny's 32
    ({"height": 272}, "body.height"),  # over tiny's 256
    ({"width": 0}, "body.width"),
    ({"width": 1024}, "body.width"),
    ({"fps": 0}, "body.fps"),
    ({"fps": 61}, "body.fps"),
    ({"num_inference_steps": 0}, "body.num_inference_steps"),
    ({"num_inference_steps": 101}, "body.num_inference_steps"),  # tiny allows 1..100
    ({"guidance_scale": -0.1}, "body.guidance_scale"),
    ({"guidance_scale": 20.5}, "body.guidance_scale"),
    ({"guidance_scale": "a lot"}, "body.guidance_scale"),
    ({"sampler": "euler"}, "body.sampler"),
    ({"seed": -1}, "body.seed"),
    ({"seed": 2**32}, "body.seed"),
    ({"model": "sora"}, "body.model"),
    ({"metadata": {"k": "v" * 513}}, "body.metadata.k"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "body.metadata"),
    ({"metadata": {"k": 1}}, "body.metadata.k"),
    ({"metadata": {f"k{i}": "é" * 200 for i in range(8)}}, "body.metadata"),  # over 2048 bytes of JSON
    ({"unknown_field": 1}, "body.unknown_field"),
    ({"prompt": "a heart\x00 beating"}, "body.prompt"),  # NUL can't reach ffmpeg's argv: refused at the door
]


@pytest.mark.parametrize(("overrides", "param"), BOUND_CASES, ids=[p + "-" + str(i) for i, (_, p) in
                                                                     enumerate(BOUND_CASES)])
def test_every_bound_is_a_422_naming_the_field(client, overrides, param):
    body = {"prompt": "a heart", **overrides}
    response = client.post("/v1/videos", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_malformed_bodies_are_422_json(client):
    for kwargs in [
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},
        {},
    ]:
        response = client.post("/v1/videos", **kwargs)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "body"


def test_submit_answers_202_at_once_with_location_and_seed(client, redis_conn, settings):
    response = client.post("/v1/videos", json={"prompt": "a beating heart, ultrasound"})
    assert response.status_code == 202, response.text  # at once: no worker runs here, the job stays queued
    job = response.json()
    assert response.headers["location"] == f"/v1/videos/{job['id']}"
    assert job["status"] == "queued" and job["stage"] == "queued" and job["progress"] == 0
    assert job["queue_position"] == 1
    assert 0 <= job["seed"] <= 2**31 - 1 and job["input"]["seed"] == job["seed"]
    assert job["input"] == {
        "prompt": "a beating heart, ultrasound", "num_frames": 16, "height": 64, "width": 64, "fps": 8,
        "num_inference_steps": 10, "guidance_scale": 7.0, "sampler": "iddpm", "seed": job["seed"],
        "prompt_sha256": hashlib.sha256(b"a beating heart, ultrasound").hexdigest(),
    }
    assert job["model"] == "tiny" and job["warnings"] == []
    assert response.headers["x-request-id"]
    # The RQ job: our id, the dotted worker function, the payload dict, our timeout.
    rq_job = Job.fetch(job["id"], connection=redis_conn)
    assert rq_job.func_name == "worker.jobs.run_video_job"
    # RQ's hard kill comes a margin after the worker's own limit, so the clean timeout always wins (failure 4)
    assert job["timeout_seconds"] == settings.job_timeout_seconds
    assert rq_job.timeout == settings.job_timeout_seconds + settings.rq_timeout_margin_seconds
    (payload,) = rq_job.args
    assert payload["job_id"] == job["id"] and payload["seed"] == job["seed"] and payload["model"] == "tiny"
    assert payload["input"] == job["input"]
    assert payload["request_id"] == response.headers["x-request-id"]
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [job["id"]]
    # TTL = retention on the job hash.
    ttl = redis_conn.ttl(jobstore.Keys(settings.key_prefix).job(job["id"]))
    assert settings.job_retention_seconds - 10 < ttl <= settings.job_retention_seconds


def test_seed_given_is_used_and_request_id_is_carried(client):
    response = client.post("/v1/videos", json={"prompt": "p", "seed": 4294967295}, headers={"X-Request-ID": "abc-1"})
    assert response.status_code == 202
    assert response.json()["seed"] == 4294967295
    assert response.headers["x-request-id"] == "abc-1"


def test_generate_alias_and_full_request(client):
    body = {
        "prompt": "mitochondria dividing", "num_frames": 8, "height": 32, "width": 48, "fps": 4,
        "num_inference_steps": 3, "guidance_scale": 4.5, "sampler": "ddim", "seed": 9, "model": "tiny",
        "metadata": {"patient_ref": "case-17"},
    }
    response = client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/videos/{job['id']}"
    expected = {k: v for k, v in body.items() if k not in ("model", "metadata")}
    expected["prompt_sha256"] = hashlib.sha256(body["prompt"].encode()).hexdigest()
    assert job["input"] == expected
    assert job["metadata"] == {"patient_ref": "case-17"}
    assert [w["code"] for w in job["warnings"]] == ["untrained_shape"]
    assert client.get(f"/v1/videos/{job['id']}").json()["input"] == expected


def test_get_unknown_and_odd_ids_are_404(client):
    for job_id in ["vid_" + "0" * 32, "nope", "x" * 128, "y" * 5000, "..%2F..%2Fetc"]:
        response = client.get(f"/v1/videos/{job_id}")
        assert response.status_code == 404, (job_id, response.text)
        assert response.json()["error"]["type"] == "not_found_error"
    for path in ["/v1/videos/vid_x/cancel", "/v1/videos/vid_x/content"]:
        method = client.post if path.endswith("cancel") else client.get
        assert method(path).status_code == 404


def test_ids_naming_other_keys_of_a_job_are_404_on_every_route(client, redis_conn, settings):
    """`vid_…:webhooks` is the key of a job's webhook attempts: it must read as "no such job", never reach
    Redis as a key name (a WRONGTYPE 500 would tell other tenants that the job exists)."""
    job_id = client.post("/v1/videos", json={"prompt": "a heart"}).json()["id"]
    redis_conn.rpush(f"{settings.key_prefix}:job:{job_id}:webhooks", "{}")  # as after a delivery attempt
    for suffix in [":webhooks", ":events", ":attempts", "%00", "X"]:
        odd = job_id + suffix
        for method, path in [("GET", f"/v1/videos/{odd}"), ("GET", f"/v1/videos/{odd}/content"),
                             ("POST", f"/v1/videos/{odd}/cancel"), ("GET", f"/v1/videos/{odd}/events"),
                             ("GET", f"/v1/videos/{odd}/webhook-attempts")]:
            response = client.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["type"] == "not_found_error"


def test_unknown_route_and_wrong_method_are_json(client):
    response = client.get("/v2/whatever")
    assert response.status_code == 404 and response.json()["error"]["code"] == "route_not_found"
    response = client.delete("/v1/videos")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]
    assert client.put("/v1/videos/vid_x").status_code == 405


def test_body_over_the_cap_is_413(client, settings):
    big = {"prompt": "x", "metadata": {"a": "b" * (settings.max_body_bytes + 10)}}
    response = client.post("/v1/videos", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    def chunks():
        yield b'{"prompt": "'
        for _ in range(settings.max_body_bytes // 1000 + 2):
            yield b"y" * 1000
        yield b'"}'

    response = client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_list_is_paged_newest_first(client):
    ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/videos", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [job["id"] for job in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert [j["id"] for j in client.get("/v1/videos").json()["data"]] == ids[::-1]
    assert client.get("/v1/videos", params={"limit": 0}).json()["error"]["param"] == "query.limit"
    assert client.get("/v1/videos", params={"limit": 101}).json()["error"]["param"] == "query.limit"
    for garbage in ["garbage", "nan_x", "inf_x", "-inf_x", "1e400_x", "1.5_vid_x", "1.5_../x", "NaN_" + "vid_" + "0" * 32]:
        bad = client.get("/v1/videos", params={"cursor": garbage})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "cursor", (garbage, bad.text)


def test_list_skips_expired_jobs(client, redis_conn, settings):
    ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(3)]
    redis_conn.delete(jobstore.Keys(settings.key_prefix).job(ids[1]))  # as if its TTL ran out
    assert [j["id"] for j in client.get("/v1/videos").json()["data"]] == [ids[2], ids[0]]
    assert redis_conn.zscore(jobstore.Keys(settings.key_prefix).tenant_jobs(TENANT), ids[1]) is None


def test_queue_position_falls(client, redis_conn, settings):
    ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(3)]
    assert [client.get(f"/v1/videos/{i}").json()["queue_position"] for i in ids] == [1, 2, 3]
    queue = Queue(settings.queue_name, connection=redis_conn)
    queue.remove(ids[0])  # as a worker dequeuing it
    jobstore.mark_running(redis_conn, ids[0], "w", prefix=settings.key_prefix)
    assert [client.get(f"/v1/videos/{i}").json()["queue_position"] for i in ids] == [None, 1, 2]


def test_cancel_queued_job_is_immediate_and_leaves_the_queue(client, redis_conn, settings):
    job_id = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    other = client.post("/v1/videos", json={"prompt": "q"}).json()["id"]
    response = client.post(f"/v1/videos/{job_id}/cancel")
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "canceled" and job["error"]["code"] == "canceled" and job["completed_at"]
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [other]
    assert not redis_conn.exists(f"rq:job:{job_id}")
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "canceled"
    again = client.post(f"/v1/videos/{job_id}/cancel")  # a retried cancel: the same answer, not an error
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    # A worker that had already dequeued it cannot start it.
    with pytest.raises(Exception, match="canceled"):
        jobstore.mark_running(redis_conn, job_id, "w", prefix=settings.key_prefix)


def test_cancel_running_job_flags_it_for_the_worker(client, redis_conn, settings):
    job_id = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    token = jobstore.mark_running(redis_conn, job_id, "w", prefix=settings.key_prefix).token
    response = client.post(f"/v1/videos/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceling"
    assert client.post(f"/v1/videos/{job_id}/cancel").json()["status"] == "canceling"  # idempotent
    from service.jobs.schemas import Stage

    status = jobstore.update_progress(redis_conn, job_id, Stage.denoising, 2, 10, prefix=settings.key_prefix,
                                      token=token)
    assert status == "canceling"  # the worker's per-step poll sees it
    jobstore.mark_canceled(redis_conn, job_id, prefix=settings.key_prefix, token=token, actor=token)
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "canceled"
    assert client.post(f"/v1/videos/{job_id}/cancel").status_code == 200


def test_other_tenants_jobs_are_404(client, redis_conn, settings):
    record = queued_record(tenant="hospital-b")
    jobstore.create(redis_conn, record, prefix=settings.key_prefix)
    assert client.get(f"/v1/videos/{record.id}").status_code == 404
    assert client.post(f"/v1/videos/{record.id}/cancel").status_code == 404
    assert client.get(f"/v1/videos/{record.id}/content").status_code == 404
    assert jobstore.get(redis_conn, record.id, prefix=settings.key_prefix).status == "queued"


def test_openapi_documents_bodies_and_error_schema(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/videos"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/VideoCreate")
    for code in ("202", "413", "422", "429", "503"):
        assert code in post["responses"], code
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "/generate" in spec["paths"]
    for path in ("/v1/videos/{job_id}", "/v1/videos/{job_id}/cancel", "/v1/videos/{job_id}/content"):
        operation = next(iter(spec["paths"][path].values()))
        assert "404" in operation["responses"], path
    assert client.get("/docs").status_code == 200


def test_list_never_shows_another_tenants_jobs(client, redis_conn, settings):
    mine = client.post("/v1/videos", json={"prompt": "p"}).json()["id"]
    jobstore.create(redis_conn, queued_record(tenant="hospital-b"), prefix=settings.key_prefix)
    assert [j["id"] for j in client.get("/v1/videos").json()["data"]] == [mine]
