"""The images built and the stack run in containers (podman), as CI's `make test-images` stage.

No registry is reachable here, so tests/deploy/images/prepare.sh first makes what would be pulled: a Debian
base (debootstrap) with Python tagged as the Dockerfiles' FROM name, Redis and an S3 server (moto) as
named stand-ins, and a local index with the pinned CPU torch wheel. Then, in order:

1. the API image from docker/Dockerfile.api as committed: runs as uid 10001, its HEALTHCHECK passes,
   /healthz answers, no torch inside;
2. the worker image's `cpu` target, with TORCH_CPU_INDEX pointed at the local index: torch is the pinned
   CPU build, no CUDA libraries;
3. docker-compose.yml's `cpu` profile under podman-compose (with tests/deploy/images/compose.override.yml
   naming the stand-ins): a job submitted to the API container runs in the worker container, its MP4 is
   downloaded and decoded; Redis is replaced by a new container on the same AOF volume and the job record
   is still there.

Not run here: MinIO (no image or binary: moto's S3 server stands in; `mc`'s bucket set-up is covered by
test_deploy_compose.py), Prometheus and Grafana (no images: their config is checked by promtool in
test_deploy_prometheus.py, and a real Prometheus scrapes real API and worker processes in
test_deploy_live.py); the CUDA worker target (needs the nvidia/cuda base and download.pytorch.org).
Images, containers, volumes and networks made here are removed at the end; the stand-ins stay cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import imageio_ffmpeg
import pytest
import yaml
from deploy_files import COMPOSE_FILE, REPO_ROOT, compose_env

from tests.support import free_port

pytestmark = [pytest.mark.images, pytest.mark.timeout(1800)]

HERE = Path(__file__).parent / "images"
CACHE = REPO_ROOT / "build" / "images"
PODMAN_COMPOSE = CACHE / "podman-compose" / "bin" / "podman-compose"
TORCH_INDEX = CACHE / "torch-index"
RUN = f"ci{os.getpid()}-{uuid.uuid4().hex[:6]}"
API_IMAGE = f"localhost/bora-api:{RUN}"
WORKER_IMAGE = f"localhost/bora-worker-cpu:{RUN}"
JOB = {"prompt": "A beating human heart, cross-section, ultrasound style", "num_frames": 8,
       "num_inference_steps": 3, "seed": 7}
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[images {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)  # noqa: T201  (the CI log)


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                            env=podman_env(), check=False)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def build(*args: str, tag: str) -> float:
    """`podman build` from the repository root; returns the seconds it took. The build's RUN steps use the
    host's network (pip reaches PyPI through it; the bridge's DNS dropped lookups under load here). No
    layer cache: every build here is removed at the end, and committing each step's layer (the torch venv is
    ~1 GB) is most of a build's time on this machine."""
    started = time.monotonic()
    result = subprocess.run(
        ["podman", "build", "--pull=never", "--format", "docker", "--network=host", "--layers=false", "--force-rm", "-t", tag,
         *args, str(REPO_ROOT)],
        capture_output=True, text=True, timeout=1500, env=podman_env(), check=False,
    )
    assert result.returncode == 0, f"build of {tag} failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return time.monotonic() - started


def run_in(image: str, *command: str, timeout: float = 120) -> str:
    return podman("run", "--rm", "--network", "none", image, *command, timeout=timeout).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def prepared() -> Iterator[None]:
    assert shutil.which("podman"), "podman missing: run tests/deploy/images/prepare.sh (make test-images does)"
    assert PODMAN_COMPOSE.exists() and (TORCH_INDEX / "simple" / "torch").is_dir(), "run prepare.sh first"
    podman("image", "exists", "docker.io/library/python:3.11.13-slim-bookworm")
    dangling_before = set(podman("images", "--quiet", "--no-trunc", "--filter", "dangling=true").stdout.split())
    yield
    for image in (API_IMAGE, WORKER_IMAGE):
        podman("rmi", "--force", image, check=False)
    # The build stages' layers: the untagged images that appeared while this ran.
    dangling = set(podman("images", "--quiet", "--no-trunc", "--filter", "dangling=true").stdout.split())
    if dangling - dangling_before:
        podman("rmi", "--force", *sorted(dangling - dangling_before), check=False, timeout=300)
    say("removed the images built here; cached stand-ins: " + podman(
        "images", "--filter", "reference=localhost/bora-ci/*", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"
    ).stdout.replace("\n", ", "))


# ---- 1. the API image -------------------------------------------------------------------------------------


def test_api_image_builds_runs_as_its_user_answers_healthz_and_has_no_torch():
    say(f"building {API_IMAGE} from docker/Dockerfile.api")
    seconds = build("-f", "docker/Dockerfile.api", tag=API_IMAGE)
    say(f"built in {seconds:.0f} s, size {podman('image', 'inspect', '--format', '{{.Size}}', API_IMAGE).stdout.strip()} bytes")
    image = json.loads(podman("image", "inspect", API_IMAGE).stdout)[0]
    assert image["Config"]["User"] == "10001:10001"
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"]), "HEALTHCHECK lost (build without --format docker?)"

    torch_check = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'diffusers')))"
    run_in(API_IMAGE, "python", "-c", torch_check)
    assert "torch" not in run_in(API_IMAGE, "pip", "list", "--format", "freeze").lower()

    port = free_port()
    name = f"bora-api-{RUN}"
    # No Redis: /healthz is the process alive, which needs none.
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-e", "BORA_REDIS_URL=redis://redis.invalid:6379/0",
           API_IMAGE)
    try:
        body = wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90, container=name)
        assert body == {"status": "ok"}
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, f"the image's HEALTHCHECK failed: {health.stdout} {health.stderr}"
        say("API container: uid 10001, HEALTHCHECK healthy, /healthz 200, no torch")
    finally:
        podman("rm", "--force", name, check=False)


def wait_http(url: str, timeout: float, container: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=3)
            if response.status_code == 200:
                return response.json()
            last = RuntimeError(f"{response.status_code} {response.text[:300]}")
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    logs = podman("logs", "--tail", "40", container, check=False).stdout if container else ""
    pytest.fail(f"{url} not answering 200 after {timeout} s: {last}\n{logs}")


# ---- 2. the worker image, cpu target ----------------------------------------------------------------------


def test_worker_cpu_image_builds_with_the_pinned_cpu_torch():
    say(f"building {WORKER_IMAGE} (target cpu; torch from the local index)")
    seconds = build(
        "-f", "docker/Dockerfile.worker", "--target", "cpu",
        "--volume", f"{TORCH_INDEX}:/torch-index:ro", "--build-arg", "TORCH_CPU_INDEX=file:///torch-index/simple",
        tag=WORKER_IMAGE,
    )
    size = int(podman("image", "inspect", "--format", "{{.Size}}", WORKER_IMAGE).stdout.strip())
    say(f"built in {seconds:.0f} s, size {size / 1e9:.2f} GB")
    version = run_in(WORKER_IMAGE, "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert version == "2.13.0+cpu None", version
    packages = run_in(WORKER_IMAGE, "pip", "list", "--format", "freeze").lower()
    assert "nvidia-" not in packages and "triton" not in packages, "CUDA libraries in the cpu image"
    assert size < 2.5e9, "a CPU worker image this big carries a CUDA build"
    image = json.loads(podman("image", "inspect", WORKER_IMAGE).stdout)[0]
    assert image["Config"]["User"] == "10001:10001"
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    say(f"worker image: torch {version}, no CUDA packages, user 10001")


# ---- 3. the compose cpu profile ---------------------------------------------------------------------------


class Stack:
    """docker-compose.yml (+ the stand-in override) under podman-compose, as its own project."""

    def __init__(self) -> None:
        self.project = f"bora-{RUN}"
        self.api_port, self.s3_port = free_port(), free_port()
        self.env = compose_env(
            COMPOSE_PROJECT_NAME=self.project,
            COMPOSE_PROFILES="cpu",
            CONTAINERS_CONF=str(HERE / "containers.conf"),
            BORA_IMAGE_PREFIX="localhost/bora",
            BORA_IMAGE_TAG=RUN,
            BORA_MODEL_PRESET="tiny",
            BORA_API_PORT=str(self.api_port),
            MINIO_API_PORT=str(self.s3_port),
            MINIO_CONSOLE_PORT=str(free_port()),
            BORA_S3_PUBLIC_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_port}",
        )

        self.healthchecks = {
            name: service["healthcheck"]["test"]
            for path in (COMPOSE_FILE, HERE / "compose.override.yml")
            for name, service in yaml.safe_load(path.read_text())["services"].items()
            if "test" in service.get("healthcheck", {})
        }

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(PODMAN_COMPOSE), "-f", str(COMPOSE_FILE), "-f", str(HERE / "compose.override.yml"), *args]
        result = subprocess.run(command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    def up(self, *services: str) -> None:
        self.compose("up", "-d", "--no-build", "--no-deps", *services)

    def container(self, service: str) -> str:
        names = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                       "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}").stdout.split()
        assert len(names) == 1, f"{service}: containers {names}"
        return names[0]

    def logs(self, service: str) -> str:
        return podman("logs", "--tail", "60", self.container(service), check=False).stderr

    def wait_healthy(self, service: str, timeout: float) -> None:
        """podman-compose ignores `condition: service_healthy` and nothing runs health checks without systemd:
        run the service's own check command in it until it passes. (Run by `podman exec` rather than
        `podman healthcheck run`: on this loaded machine a Python check can outlast the check's 5 s timeout.
        The command is read from the compose files: podman 4.3 mangles the exec form podman-compose passes.)"""
        name = self.container(service)
        test = self.healthchecks[service]  # from the files: podman 4.3 splits podman-compose's JSON form on spaces
        command = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if podman("exec", name, *command, check=False, timeout=60).returncode == 0:
                return
            time.sleep(1)
        pytest.fail(f"{service} not healthy after {timeout} s:\n{self.logs(service)}")

    def wait_exit_zero(self, service: str, timeout: float) -> None:
        name = self.container(service)
        code = podman("wait", name, timeout=timeout).stdout.strip()
        assert code == "0", f"{service} exited {code}:\n{self.logs(service)}"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.compose("down", "--volumes", "--timeout", "5", timeout=300, check=False)
        podman("volume", "prune", "--force", "--filter", f"label=io.podman.compose.project={s.project}", check=False)
        say(f"compose project {s.project} down, volumes removed")


def test_compose_cpu_profile_runs_a_job_in_containers_and_redis_keeps_it(stack):
    say("compose cpu profile: redis, S3 stand-in")
    stack.up("redis", "minio")
    stack.wait_healthy("redis", 60)
    stack.wait_healthy("minio", 90)
    stack.up("minio-setup")
    stack.wait_exit_zero("minio-setup", 120)
    stack.up("model-tiny")
    stack.wait_exit_zero("model-tiny", 240)
    say("bucket created, tiny model written to the models-tiny volume; starting api, webhooks, worker-cpu")
    stack.up("api", "webhooks", "worker-cpu")
    stack.wait_healthy("api", 120)
    stack.wait_healthy("worker-cpu", 300)  # /healthz on :9100: 200 once the model is loaded
    stack.wait_healthy("webhooks", 60)
    api = f"http://127.0.0.1:{stack.api_port}"
    ready = wait_http(f"{api}/readyz", timeout=60, container=stack.container("api"))
    assert ready["workers_ready"] == 1, ready
    say("all healthy: the API sees one ready worker")

    key = stack.compose("exec", "-T", "api", "python", "-m", "service.keys", "create", "--tenant", "ci").stdout
    key = key.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{api}/v1/videos", json=JOB, timeout=10).status_code == 401
    created = httpx.post(f"{api}/v1/videos", json=JOB, headers=headers, timeout=10)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    record = wait_for_job(api, job_id, headers, timeout=240, stack=stack)
    assert record["status"] == "succeeded", record
    say(f"job {job_id} succeeded in the worker container")

    content = httpx.get(f"{api}/v1/videos/{job_id}/content", headers=headers, timeout=10)
    assert content.status_code == 307, content.text
    assert content.headers["location"].startswith(f"http://127.0.0.1:{stack.s3_port}/")
    video = httpx.get(content.headers["location"], timeout=30)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp", video.content[:64]
    mp4 = CACHE / f"{RUN}.mp4"
    mp4.write_bytes(video.content)
    try:
        frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(mp4))
    finally:
        mp4.unlink()
    assert frames == JOB["num_frames"]
    say(f"downloaded the MP4 through its presigned URL: {len(video.content)} bytes, {frames} frames")

    # Redis: a new container on the same volume must come back with the job (append-only file, fsync always).
    old = container_id(stack.container("redis"))
    stack.compose("stop", "redis")
    podman("rm", "--force", old)
    stack.up("redis")
    assert container_id(stack.container("redis")) != old
    stack.wait_healthy("redis", 60)
    aof = podman("exec", stack.container("redis"), "ls", "/data/appendonlydir").stdout
    assert ".aof" in aof, aof
    after = wait_for_job(api, job_id, headers, timeout=60, stack=stack)
    assert after["status"] == "succeeded" and after["id"] == job_id
    say("Redis replaced by a new container on the redis-data volume: the job record survived")


def container_id(name: str) -> str:
    return podman("inspect", "--format", "{{.Id}}", name).stdout.strip()


def wait_for_job(api: str, job_id: str, headers: dict[str, str], timeout: float, stack: Stack) -> dict:
    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{api}/v1/videos/{job_id}", headers=headers, timeout=5)
            if response.status_code == 200:
                record = response.json()
                if record["status"] in {"succeeded", "failed", "canceled"}:
                    return record
        except httpx.HTTPError:
            pass  # the API reconnecting to Redis
        time.sleep(1)
    pytest.fail(f"job {job_id} not finished after {timeout} s: {record}\n{stack.logs('worker-cpu')}")
