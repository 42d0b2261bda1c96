"""The one settings object per process (API, worker, devserver), read from `BORA_*` environment variables.

Nothing else reads `os.environ`. `get_settings()` returns the process's cached instance.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BORA_", env_file=None, extra="ignore", populate_by_name=True)

    # --- API -----------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_base_url: str | None = Field(None, description="Prefix for absolute URLs, e.g. https://bora.example")
    max_prompt_chars: int = Field(2000, ge=1, le=2000)
    max_metadata_bytes: int = Field(2048, ge=2)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    list_default_limit: int = Field(20, ge=1)
    list_max_limit: int = Field(100, ge=1)

    # --- auth and admission control (service/api/auth.py, service/jobs/admission.py) ---------------------------
    auth: Literal["required", "disabled"] = Field(
        "required", description="`disabled` serves every request as tenant `default`; loopback hosts only"
    )
    api_keys_file: Path | None = Field(None, description="Hashed API keys; default $BORA_DATA_DIR/api-keys.json")
    auth_protect_health: bool = Field(False, description="Require a key on /healthz and /readyz too")
    auth_protect_metrics: bool = Field(False, description="Require a key on /metrics too")
    rate_limit_per_second: float = Field(2.0, ge=0, description="Submissions per second per tenant; 0 = off")
    rate_limit_burst: int = Field(20, ge=1, description="Submissions a tenant may make at once")
    max_queued_per_tenant: int = Field(100, ge=0, description="Queued jobs per tenant; 0 = no cap")
    max_queued_total: int = Field(1000, ge=0, description="Queued jobs in all; 0 = no cap")
    queue_full_retry_after_seconds: int = Field(10, ge=1, description="`Retry-After` when a queue cap is hit")

    # --- Redis / queue -------------------------------------------------------------------------------
    data_dir: Path = Path("./data")
    redis_url: str | None = Field(None, description="Unset: the devserver finds or embeds one.")
    redis_timeout_seconds: float = Field(1.5, gt=0)
    key_prefix: str = Field("bora", pattern=r"^[A-Za-z0-9_.-]+$")
    job_retention_seconds: int = Field(
        7 * 24 * 3600, ge=60,
        validation_alias=AliasChoices("BORA_RETENTION_SECONDS", "BORA_JOB_RETENTION_SECONDS"),  # the old name still works
        description="How long a job's record and outputs live after it ended (service/jobs/retention.py)",
    )
    retention_sweep_interval_seconds: float = Field(
        3600.0, gt=0, description="How often one replica deletes the outputs of jobs past retention"
    )
    store_prompt: bool = Field(
        True, description="false: once a job ends, only the prompt's sha256 is kept (record, sidecar, MP4 tags)"
    )
    job_timeout_seconds: int = Field(1800, ge=1, description="Run-time limit of a job; also the most a request may ask")
    rq_timeout_margin_seconds: int = Field(
        60, ge=1, description="RQ's hard kill comes this long after a job's own limit, so the clean timeout wins"
    )
    queued_expiry_seconds: int = Field(
        24 * 3600, ge=1, description="A job still queued after this long fails `expired` instead of running late"
    )
    rq_failure_ttl_seconds: int = Field(24 * 3600, ge=60)

    # --- storage -------------------------------------------------------------------------------------
    storage: Literal["local", "s3"] = "local"
    storage_dir: Path | None = Field(None, description="Local storage root; default $BORA_DATA_DIR/videos")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_prefix: str = ""
    s3_public_endpoint_url: str | None = Field(None, description="Endpoint clients use for presigned URLs")
    presign_ttl_seconds: int = Field(900, ge=1, le=7 * 24 * 3600)

    # --- model / worker ------------------------------------------------------------------------------
    model_preset: Literal["tiny", "bora", "demo"] = "tiny"
    model_dir: Path | None = Field(None, description="Default $BORA_DATA_DIR/models/<preset>")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    text_encoder_device: str = Field(
        "same", pattern=r"^(same|cpu|cuda(:\d+)?)$",
        description="Where T5 runs: `same` as the model, or `cpu` (T5-XXL is ~19 GB in fp32; only the embeddings move)",
    )
    text_encoder_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="T5 precision: fp32 as upstream, or bf16 (fp16 overflows in T5)"
    )
    attention_broadcast: str = Field(
        "model", pattern=r"^(model|off|[1-9]\d*,[1-9]\d*,[1-9]\d*)$",
        description="Pyramid attention broadcast: `model` (the pipeline folder's default), `off`, or "
        "`SPATIAL,TEMPORAL,CROSS` (recompute each attention every n steps mid-run)",
    )
    worker_metrics_port: int = Field(9100, ge=0, le=65535)
    worker_id: str | None = Field(
        None, description="Default <hostname>-<pid>-<random>, new on every start; a pinned id must be unique per live worker"
    )
    heartbeat_interval_seconds: float = Field(5.0, gt=0)
    heartbeat_ttl_seconds: int = Field(30, ge=1)
    # Worker loss (service/jobs/reaper.py): every worker and the API look for jobs of dead workers this often;
    # a job is re-queued until it has run `reaper_max_attempts` times, then fails `worker_lost`.
    reaper_interval_seconds: float = Field(10.0, gt=0)
    reaper_max_attempts: int = Field(2, ge=1)
    reaper_queued_grace_seconds: float = Field(
        60.0, gt=0, description="A queued job missing from RQ's queue this long is put back on it"
    )
    cancel_grace_seconds: float = Field(
        120.0, gt=0, description="A cancel the running worker has not finished after this long ends `canceled`"
    )
    max_consecutive_ooms: int = Field(3, ge=1, description="The worker exits (non-zero) after this many OOMs in a row")
    # Batching (worker/batch.py): a worker that takes a job also claims up to `worker_batch_size - 1` queued jobs
    # it can compute with it (same model, shape, steps, sampler and guidance) and runs them as one batch.
    worker_batch_size: int = Field(1, ge=1, le=64, description="Jobs one pipeline call may run together; 1 = off")
    reaper_in_api: bool = Field(True, description="The API runs the reaper too (recovery with no worker up)")
    # Storage faults: an upload is tried this often, backing off from `upload_backoff_seconds` (doubling).
    upload_attempts: int = Field(4, ge=1)
    upload_backoff_seconds: float = Field(0.5, ge=0)

    # --- webhooks and live events (see service/jobs/webhooks.py, service/api/routes/events.py) -------------------
    webhook_allowed_hosts: str = Field(
        "", description="Comma-separated `host[:port]` webhooks may go to (`*.example.org` = any subdomain; no "
        "port = 443 only); empty = off"
    )
    webhook_secret: SecretStr | None = Field(None, description="Master secret; each tenant's is derived from it")
    webhook_allow_http_loopback: bool = Field(False, description="Allow http:// to loopback hosts (tests only)")
    webhook_backoff_seconds: list[float] | None = Field(
        None, description="Wait before attempt 2, 3, ... (JSON list); default service.jobs.webhooks.BACKOFF_SECONDS"
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60)
    webhook_workers: int = Field(8, ge=1, le=64, description="Deliveries one sender process makes at once")
    webhook_max_per_destination: int = Field(
        2, ge=1, description="Deliveries in flight to one host:port at once, across every sender process"
    )
    events_poll_interval_seconds: float = Field(0.5, gt=0)
    events_keepalive_seconds: float = Field(15.0, gt=0)
    events_max_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "videos"
        if self.model_dir is None:
            self.model_dir = self.data_dir / "models" / self.model_preset
        if self.api_keys_file is None:
            self.api_keys_file = self.data_dir / "api-keys.json"
        if self.auth == "disabled" and not is_loopback(self.host):
            raise ValueError(
                f"BORA_AUTH=disabled is refused with BORA_HOST={self.host}: without keys the API may only listen "
                "on a loopback address. Create a key (`bora keys create --tenant NAME`) and keep BORA_AUTH=required."
            )
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("BORA_STORAGE=s3 needs BORA_S3_BUCKET")
        if self.webhook_allowed_hosts.strip() and self.webhook_secret is None:
            raise ValueError("BORA_WEBHOOK_ALLOWED_HOSTS needs BORA_WEBHOOK_SECRET (the signing master secret)")
        _ = self.webhook_hosts  # a malformed entry fails the start-up, not a delivery
        if self.list_default_limit > self.list_max_limit:
            raise ValueError("BORA_LIST_DEFAULT_LIMIT must not exceed BORA_LIST_MAX_LIMIT")
        return self

    @property
    def queue_name(self) -> str:
        """The RQ queue of video jobs (named in one place, service.jobs.jobstore, with every other Redis key)."""
        from service.jobs.jobstore import (
            queue_name,  # here: config is the bottom layer, importing none of ours
        )

        return queue_name(self.key_prefix)

    @property
    def webhook_hosts(self) -> list[tuple[str, int]]:
        """The allowlist as (host or `*.suffix`, port) pairs; an entry without a port allows 443 only."""
        return [webhook_destination(entry) for entry in self.webhook_allowed_hosts.split(",") if entry.strip()]


_WEBHOOK_ENTRY = re.compile(r"^(\*\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(?::(\d{1,5}))?$")


def webhook_destination(entry: str) -> tuple[str, int]:
    """`host[:port]` of BORA_WEBHOOK_ALLOWED_HOSTS as (host, port); ValueError names a bad entry."""
    match = _WEBHOOK_ENTRY.match(entry.strip().lower().rstrip("."))
    port = int(match.group(3) or 443) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise ValueError(f"BORA_WEBHOOK_ALLOWED_HOSTS entry {entry.strip()!r} is not host[:port] (port 1-65535)")
    return (match.group(1) or "") + match.group(2).strip("[]"), port


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1, ::ffff:127.x.x.x)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket reports IPv4 peers this way
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
