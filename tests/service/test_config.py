"""Settings come from BORA_* variables, with derived defaults and start-up checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.jobs.config import Settings


def test_environment_and_derived_paths(monkeypatch, tmp_path):
    for name, value in {
        "BORA_PORT": "9001", "BORA_DATA_DIR": str(tmp_path), "BORA_REDIS_URL": "redis://h:1/2",
        "BORA_KEY_PREFIX": "p1", "BORA_MODEL_PRESET": "bora", "BORA_JOB_RETENTION_SECONDS": "3600",
        "BORA_S3_SECRET_ACCESS_KEY": "hidden",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.port == 9001 and settings.redis_url == "redis://h:1/2" and settings.queue_name == "p1-videos"
    assert settings.storage_dir == tmp_path / "videos"
    assert settings.model_dir == tmp_path / "models" / "bora"
    assert settings.job_retention_seconds == 3600
    assert "hidden" not in repr(settings)


def test_defaults():
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port, settings.key_prefix, settings.storage) == ("127.0.0.1", 8000, "bora", "local")
    assert settings.job_retention_seconds == 604800 and settings.job_timeout_seconds == 1800
    assert settings.worker_metrics_port == 9100 and settings.model_preset == "tiny"


@pytest.mark.parametrize("bad", [
    {"storage": "s3"}, {"port": 0}, {"key_prefix": "a b"}, {"device": "tpu"}, {"model_preset": "sora"},
    {"list_default_limit": 500},
])
def test_bad_settings_fail_at_start(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)
