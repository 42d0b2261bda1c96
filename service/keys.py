"""API keys, each bound to a tenant, stored only as salted hashes in one JSON file.

A key reads `bora_<key_id>_<secret>`. The key id is public (it names the key in `bora keys list` and lets
`authenticate` find the one record to compare against); the secret is 256 random bits, shown once by
`create_key` and never stored. The file holds `{key_id, tenant, salt, hash, iterations, created_at, revoked}`.

Why PBKDF2-SHA256 with a modest iteration count rather than a slow KDF tuned for passwords: the secret is
random, not chosen by a person, so brute force is hopeless whatever the cost; the iterations only add
depth. A slow KDF would instead cost every API request tens of milliseconds of CPU. `iterations` is stored
per key, so the count can change without invalidating old keys. Successful checks are cached in memory
(keyed by an HMAC of the presented key under a per-process random key), so a busy client costs one hash.

The file is rewritten atomically (temp file + `os.replace`) with mode 0600, and every read-modify-write holds an
exclusive `flock` on a lock file beside it, so concurrent `bora keys create/revoke` never lose a key or undo a
revocation. A file that other users can read, or that does not parse, is refused with `KeyFileError`: at API
start-up that stops the process with the reason; later, the API keeps the last good keys and logs the error.
The API's `KeyStore` re-reads the file when it changes, so `bora keys create/revoke` take effect without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

KEY_PREFIX = "bora"
ITERATIONS = 10_000
# Tenants end up inside Redis keys (`P:tenant:{t}:jobs`, `P:idem:{t}:...`): keep them boring.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CACHE_LIMIT = 1024
_FIELDS = {"key_id", "tenant", "salt", "hash", "iterations", "created_at", "revoked"}
log = logging.getLogger(__name__)


class KeyFileError(Exception):
    """The key file can't be trusted: readable by other users, or not a key file."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _hash(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


def _split(presented: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None. The secret may itself contain '_'."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def _read(path: Path) -> list[dict[str, Any]]:
    """The key records; [] when the file does not exist yet."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        text = path.read_text()
    except FileNotFoundError:
        return []
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by other users (mode {oct(mode & 0o777)}): run chmod 600 {path}")
    try:
        records = json.loads(text)["keys"]
    except (ValueError, KeyError, TypeError) as error:
        raise KeyFileError(f"{path} is not a valid key file ({type(error).__name__}: {error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and _FIELDS <= r.keys() for r in records):
        raise KeyFileError(f"{path} is not a valid key file (every key needs {', '.join(sorted(_FIELDS))})")
    return records


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of the key file (a lock file, as the file is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomic replace; the file is never visible half-written nor readable by other users."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "keys": records}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(path: Path, tenant: str) -> str:
    """Store a new key for `tenant` and return it in plaintext — the only time it exists outside a client."""
    if not TENANT_RE.match(tenant):
        raise ValueError(f"tenant {tenant!r} must match {TENANT_RE.pattern}")
    path = Path(path)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    digest = _hash(secret, salt, ITERATIONS)  # before taking the lock: nobody waits for our hashing
    with _exclusive(path):
        records = _read(path)
        taken = {r["key_id"] for r in records}
        key_id = secrets.token_hex(6)
        while key_id in taken:
            key_id = secrets.token_hex(6)
        records.append(
            {
                "key_id": key_id,
                "tenant": tenant,
                "salt": _b64(salt),
                "hash": _b64(digest),
                "iterations": ITERATIONS,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "revoked": False,
            }
        )
        _write(path, records)
    return f"{KEY_PREFIX}_{key_id}_{secret}"


def list_keys(path: Path) -> list[dict[str, Any]]:
    """Every key's public fields (no salt, no hash)."""
    return [
        {k: r[k] for k in ("key_id", "tenant", "created_at", "revoked")} for r in _read(path)
    ]


def revoke_key(path: Path, key_id: str) -> bool:
    """Mark a key revoked (kept for the audit trail). False when no such key."""
    path = Path(path)
    with _exclusive(path):
        records = _read(path)
        for record in records:
            if record["key_id"] == key_id:
                record["revoked"] = True
                _write(path, records)
                return True
    return False


class KeyStore:
    """The API's view of the key file: loaded at start-up (a bad file raises `KeyFileError` there), re-read when
    the file's mtime/size/inode change; a bad file after start-up keeps the last good keys and logs why."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._verified: dict[bytes, str] = {}  # HMAC(process key, presented) -> key_id
        self._cache_key = secrets.token_bytes(32)
        self._dummy_salt = secrets.token_bytes(16)
        self._refresh(at_startup=True)

    def _tag(self, presented: str) -> bytes:
        return hmac.new(self._cache_key, presented.encode(), hashlib.sha256).digest()

    def _refresh(self, at_startup: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                records = {r["key_id"]: r for r in _read(self.path)} if stamp else {}
            except KeyFileError as error:
                if at_startup:
                    raise
                log.error("key file refused, keeping the last good keys: %s", error)
                self._stamp = stamp  # logged once per change of the file
                return
            self._records, self._verified, self._stamp = records, {}, stamp

    def authenticate_cached(self, presented: str) -> str | None:
        """The tenant of a key verified before and not revoked since, else None (then ask `authenticate`).
        No hashing beyond one HMAC: cheap enough to run on the event loop."""
        self._refresh()
        key_id = self._verified.get(self._tag(presented))
        record = self._records.get(key_id) if key_id is not None else None
        return str(record["tenant"]) if record is not None and not record["revoked"] else None

    def authenticate(self, presented: str) -> str | None:
        """The tenant the key belongs to, or None (unknown, revoked, malformed or wrong secret). A key seen
        for the first time costs one PBKDF2 (milliseconds): call it off the event loop.

        Unknown ids and malformed keys still run one hash so that timing does not say which ids exist."""
        self._refresh()
        tag = self._tag(presented)
        cached = self._verified.get(tag)
        if cached is not None:
            record = self._records.get(cached)
            return record["tenant"] if record and not record["revoked"] else None
        parts = _split(presented)
        record = self._records.get(parts[0]) if parts else None
        if parts is None or record is None:
            _hash(presented, self._dummy_salt, ITERATIONS)
            return None
        digest = _hash(parts[1], base64.b64decode(record["salt"]), int(record["iterations"]))
        if not hmac.compare_digest(digest, base64.b64decode(record["hash"])) or record["revoked"]:
            return None
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
        self._verified[tag] = record["key_id"]
        return str(record["tenant"])


# --- `bora keys ...` (mounted on the main CLI in worker/cli.py) -----------------------------------------

keys_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Manage API keys (hashed, per tenant).")

KeysFile = Annotated[
    Path | None,
    typer.Option("--file", help="Key file (default: the API's, $BORA_API_KEYS_FILE or $BORA_DATA_DIR/api-keys.json)"),
]


def _keys_file(file: Path | None) -> Path:
    """The file given, else the one the API reads (its settings, so the two can never disagree)."""
    if file is not None:
        return file
    from service.jobs.config import Settings

    return Settings().api_keys_file  # type: ignore[return-value]  # derived, never None


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@keys_app.command("create")
def create_command(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the key acts for")],
    file: KeysFile = None,
) -> None:
    """Create a key; it is printed once, as the last line, and only its hash is stored."""
    file = _keys_file(file)
    try:
        key = create_key(file, tenant)
    except KeyFileError as error:
        _fail(str(error))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--tenant") from error
    key_id = key.split("_", 2)[1]
    typer.echo(f"created key {key_id} for tenant {tenant} in {file}; store it now, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def list_command(file: KeysFile = None) -> None:
    """List keys: id, tenant, created, status. Secrets are never stored, so never shown."""
    file = _keys_file(file)
    try:
        keys = list_keys(file)
    except KeyFileError as error:
        _fail(str(error))
    if not keys:
        typer.echo(f"no keys in {file}; create one with: bora keys create --tenant NAME", err=True)
    for key in keys:
        status = "revoked" if key["revoked"] else "active"
        typer.echo(f"{key['key_id']}\t{key['tenant']}\t{key['created_at']}\t{status}")


@keys_app.command("revoke")
def revoke_command(key_id: Annotated[str, typer.Argument()], file: KeysFile = None) -> None:
    """Revoke a key by id; the API stops accepting it at its next request."""
    file = _keys_file(file)
    try:
        revoked = revoke_key(file, key_id)
    except KeyFileError as error:
        _fail(str(error))
    if not revoked:
        typer.echo(f"no key {key_id} in {file}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


if __name__ == "__main__":  # `python -m service.keys create --tenant NAME`: works in the torch-free API image
    keys_app()
