"""The one settings object per process (API, worker, devserver), read from `BORA_*` environment variables.

Nothing else reads `os.environ`. `get_settings()` returns the process's cached instance.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BORA_", env_file=None, extra="ignore")

    # --- API -----------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_base_url: str | None = Field(None, description="Prefix for absolute URLs, e.g. https://bora.example")
    max_prompt_chars: int = Field(2000, ge=1, le=2000)
    max_metadata_bytes: int = Field(2048, ge=2)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    list_default_limit: int = Field(20, ge=1)
    list_max_limit: int = Field(100, ge=1)

    # --- Redis / queue -------------------------------------------------------------------------------
    data_dir: Path = Path("./data")
    redis_url: str | None = Field(None, description="Unset: the devserver finds or embeds one.")
    redis_timeout_seconds: float = Field(1.5, gt=0)
    key_prefix: str = Field("bora", pattern=r"^[A-Za-z0-9_.-]+$")
    job_retention_seconds: int = Field(7 * 24 * 3600, ge=60)
    job_timeout_seconds: int = Field(1800, ge=1)
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
    model_preset: Literal["tiny", "bora"] = "tiny"
    model_dir: Path | None = Field(None, description="Default $BORA_DATA_DIR/models/<preset>")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    worker_metrics_port: int = Field(9100, ge=0, le=65535)
    worker_id: str | None = Field(None, description="Default <hostname>-<pid>")
    heartbeat_interval_seconds: float = Field(5.0, gt=0)
    heartbeat_ttl_seconds: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "videos"
        if self.model_dir is None:
            self.model_dir = self.data_dir / "models" / self.model_preset
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("BORA_STORAGE=s3 needs BORA_S3_BUCKET")
        if self.list_default_limit > self.list_max_limit:
            raise ValueError("BORA_LIST_DEFAULT_LIMIT must not exceed BORA_LIST_MAX_LIMIT")
        return self

    @property
    def queue_name(self) -> str:
        return f"{self.key_prefix}-videos"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
