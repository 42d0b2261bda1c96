"""Object storage behind one small interface: a local folder (embedded default) or S3 (AWS, MinIO, ...).

Both backends make an object visible only once it is complete: local writes go to a temporary file in the
same folder and are renamed into place (`os.replace`); an S3 PUT (or multipart upload) is atomic.
The worker writes with `put_file`/`put_bytes`; the API reads (`local_path` to stream, `presigned_url` to
redirect). Torch-free, so the worker imports it from here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from service.jobs.errors import StorageError

if TYPE_CHECKING:
    from service.jobs.config import Settings


def check_key(key: str) -> str:
    """Keys are relative POSIX paths without `..`; anything else is a bug upstream."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or "\\" in key or key.endswith("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    """Objects addressed by key, e.g. `videos/vid_xxx/video.mp4`."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path, content_type: str) -> None:
        """Store the file at `path` under `key`, atomically (never half-visible)."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as handle:
            handle.write(data)
        try:
            self.put_file(key, handle.name, content_type)
        finally:
            os.unlink(handle.name)

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Bytes of the object; raises FileNotFoundError when absent."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Whole object (small objects: sidecars, tests); raises FileNotFoundError when absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    @abstractmethod
    def list_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last modified in unix seconds) of every object whose key starts with `prefix` (a folder,
        ending in `/`); the objects of one folder come one after another."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path the API can stream from, or None (S3)."""
        return None

    def presigned_url(self, key: str, ttl_seconds: int, filename: str | None = None) -> str | None:
        """A time-limited GET URL, or None when the backend serves through the API (local)."""
        return None

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError when the backend is unusable (missing folder/bucket, unreachable)."""


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: str | Path, content_type: str) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        """Remove the file and the folders it leaves empty (`videos/{job}/{attempt}/`, `videos/{job}/`)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): the folders above are not empty either
                break

    def list_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self.root / prefix
        for folder, subfolders, files in os.walk(base):
            subfolders.sort()
            for name in sorted(files):
                path = Path(folder) / name
                try:
                    modified = path.stat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield path.relative_to(self.root).as_posix(), modified

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} is not usable: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage folder {self.root} is not writable")


class S3Storage(Storage):
    """S3 through boto3 (signature v4). `public_endpoint_url` signs URLs for clients that reach the object
    store under another name than the service does (e.g. http://minio:9000 inside compose)."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "path",
        prefix: str = "",
        public_endpoint_url: str | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=timeout_seconds,
            read_timeout=max(timeout_seconds, 30.0),
        )
        common: dict[str, Any] = dict(
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, **common)
        self.presign_client = (
            boto3.client("s3", endpoint_url=public_endpoint_url, **common) if public_endpoint_url else self.client
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self) -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, Boto3Error)

    def put_file(self, key: str, path: str | Path, content_type: str) -> None:
        try:
            self.client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
            )
        except self._errors() as exc:  # incl. boto3's S3UploadFailedError
            raise StorageError(f"cannot upload {key} to s3://{self.bucket}: {exc}") from exc

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"cannot read {key} from s3://{self.bucket}: {exc}") from exc
        except self._errors() as exc:
            raise StorageError(f"cannot read {key} from s3://{self.bucket}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(key)
        return int(head["ContentLength"])

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(key) from exc
            raise StorageError(f"cannot read {key} from s3://{self.bucket}: {exc}") from exc
        except self._errors() as exc:
            raise StorageError(f"cannot read {key} from s3://{self.bucket}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors() as exc:
            raise StorageError(f"cannot delete {key} from s3://{self.bucket}: {exc}") from exc

    def list_objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        """S3 lists keys in lexicographic order, so one folder's objects come together."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for entry in page.get("Contents", []):
                    yield entry["Key"][strip:], entry["LastModified"].timestamp()
        except self._errors() as exc:
            raise StorageError(f"cannot list s3://{self.bucket}/{full}: {exc}") from exc

    def presigned_url(self, key: str, ttl_seconds: int, filename: str | None = None) -> str | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'inline; filename="{filename}"'
        try:
            return self.presign_client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_seconds)
        except self._errors() as exc:
            raise StorageError(f"cannot sign a URL for {key}: {exc}") from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors() as exc:
            raise StorageError(f"bucket s3://{self.bucket} is not reachable: {exc}") from exc

    def create_bucket(self) -> None:
        """Create the bucket if missing (embedded/dev set-ups and tests)."""
        from botocore.exceptions import ClientError

        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        assert settings.s3_bucket  # Settings validates this
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        return S3Storage(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret,
            addressing_style=settings.s3_addressing_style,
            prefix=settings.s3_prefix,
            public_endpoint_url=settings.s3_public_endpoint_url,
        )
    assert settings.storage_dir is not None
    return LocalStorage(settings.storage_dir)


OUTPUTS_PREFIX = "videos/"


def output_key(job_id: str, name: str, attempt: int) -> str:
    """Where a run's outputs live: `videos/<job_id>/<attempt>/<name>` (video.mp4, thumbnail.jpg,
    metadata.json). Per attempt, so a late or superseded run never overwrites or deletes another run's."""
    return f"{OUTPUTS_PREFIX}{job_id}/{attempt}/{name}"
