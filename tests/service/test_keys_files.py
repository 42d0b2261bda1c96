"""The key file under concurrent `bora keys` processes, with unsafe permissions, and when it does not parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.keys import KeyFileError, KeyStore, create_key, list_keys

REPO_ROOT = Path(__file__).resolve().parents[2]


def _keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m service.keys ...` in its own interpreter, as an operator's shell runs it."""
    return subprocess.run([sys.executable, "-m", "service.keys", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_concurrent_creates_keep_every_key(tmp_path):
    path = tmp_path / "keys.json"
    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(lambda i: _keys_cli("create", "--tenant", f"t{i}", "--file", str(path)), range(6)))
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    printed = {run.stdout.strip().splitlines()[-1].split("_")[1] for run in runs}
    assert {key["key_id"] for key in list_keys(path)} == printed and len(printed) == 6


def test_revoke_racing_creates_stays_revoked(tmp_path):
    path = tmp_path / "keys.json"
    for trial in range(10):
        victim = create_key(path, "victim").split("_")[1]
        with ThreadPoolExecutor(3) as pool:
            creates = [pool.submit(_keys_cli, "create", "--tenant", f"t{trial}", "--file", str(path)) for _ in range(2)]
            revoke = pool.submit(_keys_cli, "revoke", victim, "--file", str(path))
            assert revoke.result().returncode == 0 and all(c.result().returncode == 0 for c in creates)
        state = {key["key_id"]: key["revoked"] for key in list_keys(path)}
        assert state[victim] is True, f"trial {trial}: the revoked key is active again"
    assert len(list_keys(path)) == 30


def test_group_or_world_readable_file_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    key = create_key(path, "a")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyStore(path)
    listed = _keys_cli("list", "--file", str(path))
    assert listed.returncode == 1 and listed.stderr.startswith("error: ") and "Traceback" not in listed.stderr
    os.chmod(path, 0o600)
    assert KeyStore(path).authenticate(key) == "a"


@pytest.mark.parametrize("text", ["{not json", "[]", '{"keys": [{"key_id": "x"}]}', '{"keys": 3}'])
def test_broken_file_is_a_clear_startup_error(tmp_path, text):
    path = tmp_path / "keys.json"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not a valid key file"):
        KeyStore(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORA_")}
    env |= {"BORA_API_KEYS_FILE": str(path), "BORA_DATA_DIR": str(tmp_path), "BORA_REDIS_URL": "redis://127.0.0.1:6379/11"}
    started = subprocess.run([sys.executable, "-c", "import service.main; service.main.app"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 1
    assert started.stderr.strip() == f"bora API: {path} is not a valid key file" + started.stderr.strip().split(
        "not a valid key file", 1)[1]


def test_file_broken_after_startup_keeps_the_last_good_keys(tmp_path, caplog):
    path = tmp_path / "keys.json"
    key = create_key(path, "a")
    store = KeyStore(path)
    assert store.authenticate(key) == "a"
    path.write_text(json.dumps({"keys": "oops"}) + " " * 10)  # another size: the store notices the change
    assert store.authenticate(key) == "a"
    assert "key file refused" in caplog.text


def test_list_without_a_file_says_so(tmp_path):
    listed = _keys_cli("list", "--file", str(tmp_path / "none.json"))
    assert listed.returncode == 0 and listed.stdout == "" and "no keys in" in listed.stderr
