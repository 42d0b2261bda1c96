"""Shared test fixtures: the repo root, the upstream reference vectors, a tiny model folder built once."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert REFERENCE_DIR.is_dir(), f"reference vectors missing at {REFERENCE_DIR}"
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The `tiny` pipeline folder, built once per test session (a few seconds, no downloads)."""
    from model.presets import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")
