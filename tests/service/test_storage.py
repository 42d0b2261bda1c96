"""Both storage backends: local folder and S3 over HTTP (moto's server). Objects appear only when complete."""

from __future__ import annotations

import secrets
import threading

import httpx
import pytest

from service.jobs.config import Settings
from service.jobs.errors import StorageError
from service.jobs.storage import LocalStorage, S3Storage, Storage, make_storage, output_key


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    server = request.getfixturevalue("s3_server")
    s3 = S3Storage("bora-test-" + secrets.token_hex(4), endpoint_url=server,
                   access_key_id="k", secret_access_key="s")
    s3.create_bucket()
    s3.create_bucket()  # idempotent
    return s3


def test_round_trip(store, tmp_path):
    source = tmp_path / "in.mp4"
    source.write_bytes(b"\x00mp4" * 1000)
    key = output_key("vid_1", "video.mp4", 1)
    assert key == "videos/vid_1/1/video.mp4"
    assert not store.exists(key)
    store.put_file(key, source, "video/mp4")
    assert store.exists(key) and store.size(key) == 4000
    assert store.read_bytes(key) == source.read_bytes()
    store.put_bytes("videos/vid_1/metadata.json", b"{}", "application/json")
    assert store.read_bytes("videos/vid_1/metadata.json") == b"{}"
    store.delete(key)
    store.delete(key)  # absent is fine
    assert not store.exists(key)
    with pytest.raises(FileNotFoundError):
        store.size(key)
    with pytest.raises(FileNotFoundError):
        store.read_bytes(key)
    store.check()


@pytest.mark.parametrize("key", ["", "/abs", "../x", "a/../../b", "a\\b", "dir/"])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(ValueError):
        store.exists(key)


def test_local_write_is_atomic(tmp_path):
    """A reader polling the key never sees a partial file; no temp file is left behind."""
    store = LocalStorage(tmp_path / "objects")
    payload = b"x" * (8 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    key = "videos/vid_2/video.mp4"
    sizes: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        path = store.local_path(key)
        while not stop.is_set():
            if path.exists():
                sizes.append(path.stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(3):
        store.put_file(key, source, "video/mp4")
    stop.set()
    watcher.join()
    assert sizes and set(sizes) == {len(payload)}
    assert [p.name for p in (tmp_path / "objects" / "videos" / "vid_2").iterdir()] == ["video.mp4"]


def test_local_write_failure_is_a_storage_error(tmp_path):
    (tmp_path / "objects").write_text("a file where the root folder should be")
    store = LocalStorage(tmp_path / "objects")
    with pytest.raises(StorageError):
        store.put_bytes("videos/a.mp4", b"x", "video/mp4")
    with pytest.raises(StorageError):
        store.check()


def test_s3_presigned_url_and_public_endpoint(s3_server):
    store = S3Storage("bora-presign", endpoint_url=s3_server, access_key_id="k", secret_access_key="s",
                      public_endpoint_url="http://videos.example:9000")
    store.create_bucket()
    store.put_bytes("videos/v/video.mp4", b"movie", "video/mp4")
    url = store.presigned_url("videos/v/video.mp4", 60, filename="v.mp4")
    assert url.startswith("http://videos.example:9000/bora-presign/videos/v/video.mp4?")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    local = store.presign_client is store.client or S3Storage(
        "bora-presign", endpoint_url=s3_server, access_key_id="k", secret_access_key="s")
    direct = local.presigned_url("videos/v/video.mp4", 60)
    response = httpx.get(direct)
    assert response.status_code == 200 and response.content == b"movie"
    assert response.headers["content-type"] == "video/mp4"


def test_s3_prefix_and_errors(s3_server, tmp_path):
    store = S3Storage("bora-prefixed", endpoint_url=s3_server, access_key_id="k", secret_access_key="s",
                      prefix="/tenant-a/")
    store.create_bucket()
    store.put_bytes("videos/v/x.jpg", b"jpg", "image/jpeg")
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket="bora-prefixed")["Contents"]]
    assert keys == ["tenant-a/videos/v/x.jpg"]
    missing = S3Storage("no-such-bucket", endpoint_url=s3_server, access_key_id="k", secret_access_key="s")
    with pytest.raises(StorageError):
        missing.check()
    with pytest.raises(StorageError):
        missing.put_bytes("videos/v/x.jpg", b"jpg", "image/jpeg")
    closed = S3Storage("b", endpoint_url="http://127.0.0.1:1", access_key_id="k", secret_access_key="s",
                       timeout_seconds=0.5)
    with pytest.raises(StorageError):
        closed.exists("videos/v/x.jpg")


def test_make_storage_from_settings(tmp_path, s3_server):
    local = make_storage(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "videos").resolve()
    s3 = make_storage(Settings(storage="s3", s3_bucket="bkt", s3_endpoint_url=s3_server,
                               s3_access_key_id="k", s3_secret_access_key="s"))
    assert isinstance(s3, S3Storage) and s3.bucket == "bkt"
    with pytest.raises(ValueError, match="BORA_S3_BUCKET"):
        Settings(storage="s3")
