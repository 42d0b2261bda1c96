"""API keys: hashed storage, constant-time authenticate, reload on change, and the `keys` CLI."""

from __future__ import annotations

import json
import os
import stat

from typer.testing import CliRunner

from service import keys
from service.keys import KeyStore, create_key, keys_app, list_keys, revoke_key


def test_create_stores_only_a_salted_hash(tmp_path):
    path = tmp_path / "sub" / "api-keys.json"
    key = create_key(path, "hospital-a")
    prefix, key_id, secret = key.split("_", 2)
    assert prefix == "bora" and len(secret) >= 40
    text = path.read_text()
    assert secret not in text and key not in text
    (record,) = json.loads(text)["keys"]
    assert set(record) == {"key_id", "tenant", "salt", "hash", "iterations", "created_at", "revoked"}
    assert record["key_id"] == key_id and record["tenant"] == "hospital-a" and record["revoked"] is False
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # no temp file left behind; the lock file of `bora keys` stays
    assert sorted(p.name for p in path.parent.iterdir()) == [".api-keys.json.lock", "api-keys.json"]
    # Same secret for two keys still hashes differently (per-key salt).
    other = json.loads(path.read_text())["keys"][0]
    create_key(path, "hospital-a")
    second = json.loads(path.read_text())["keys"][1]
    assert second["salt"] != other["salt"]


def test_authenticate(tmp_path):
    path = tmp_path / "k.json"
    a, b = create_key(path, "a"), create_key(path, "b")
    store = KeyStore(path)
    assert store.authenticate(a) == "a"
    assert store.authenticate(a) == "a"  # cached path
    assert store.authenticate(b) == "b"
    key_id = a.split("_")[1]
    wrong_secret = a[:-3] + ("xyz" if not a.endswith("xyz") else "abc")
    for bad in [wrong_secret, "", "bora", "bora__", "Bearer " + a, f"bora_{key_id}_", "bora_nope_" + "s" * 43,
                a.replace("bora_", "other_", 1), b.replace(b.split("_")[1], key_id, 1)]:
        assert store.authenticate(bad) is None, bad


def test_revoke_and_new_keys_apply_without_restart(tmp_path):
    path = tmp_path / "k.json"
    store = KeyStore(path)
    assert store.authenticate("bora_x_y") is None  # no file yet: nobody gets in
    key = create_key(path, "t1")
    assert store.authenticate(key) == "t1"
    key_id = key.split("_")[1]
    assert revoke_key(path, key_id) is True
    assert revoke_key(path, "missing") is False
    assert store.authenticate(key) is None  # even though it was cached
    assert list_keys(path) == [
        {"key_id": key_id, "tenant": "t1", "created_at": list_keys(path)[0]["created_at"], "revoked": True}
    ]
    path.unlink()
    assert store.authenticate(key) is None


def test_tenant_names_are_checked(tmp_path):
    for bad in ["", "a b", "x:y", "-lead", "t" * 65]:
        try:
            create_key(tmp_path / "k.json", bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted tenant {bad!r}")


def test_unknown_ids_still_cost_a_hash(tmp_path, monkeypatch):
    """Timing flatness, checked structurally: every failing path runs exactly one PBKDF2."""
    path = tmp_path / "k.json"
    key = create_key(path, "t")
    store = KeyStore(path)
    calls = []
    real = keys._hash
    monkeypatch.setattr(keys, "_hash", lambda *a: calls.append(1) or real(*a))
    for presented in ["garbage", "bora_unknown_secret", key[:-1] + "A" if key[-1] != "A" else key[:-1] + "B"]:
        calls.clear()
        assert store.authenticate(presented) is None
        assert len(calls) == 1, presented


def test_cli(tmp_path, monkeypatch):
    path = tmp_path / "cli-keys.json"
    runner = CliRunner()
    result = runner.invoke(keys_app, ["create", "--tenant", "clinic", "--file", str(path)])
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    assert KeyStore(path).authenticate(key) == "clinic"

    monkeypatch.setenv("BORA_API_KEYS_FILE", str(path))  # the option falls back to the setting's variable
    listed = runner.invoke(keys_app, ["list"])
    assert listed.exit_code == 0 and "clinic" in listed.output and "active" in listed.output
    assert key.split("_", 2)[2] not in listed.output

    key_id = key.split("_")[1]
    assert runner.invoke(keys_app, ["revoke", key_id]).exit_code == 0
    assert KeyStore(path).authenticate(key) is None
    assert runner.invoke(keys_app, ["revoke", "nope"]).exit_code == 1
    assert runner.invoke(keys_app, ["create", "--tenant", "bad name"]).exit_code != 0
