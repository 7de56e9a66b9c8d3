"""Object store: a file:// folder and s3:// (moto's S3 server standing in for MinIO)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from batchscore.storage.object_store import LocalStore, ObjectStore, S3Store, StoreError


@pytest.fixture
def local_store(tmp_path: Path) -> ObjectStore:
    return ObjectStore.from_url((tmp_path / "store").as_uri())


@pytest.fixture
def s3_store(s3_env, settings_for) -> ObjectStore:
    settings = settings_for(s3_env)
    return ObjectStore.from_url(s3_env["BATCHSCORE_STORE_URL"], settings)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_backend_follows_the_url(local_store, s3_store):
    assert isinstance(local_store, LocalStore)
    assert isinstance(s3_store, S3Store)


def test_put_get_exists_round_trip(store):
    payload = bytes(range(256)) * 10
    uri = store.put_bytes("models/run-1/svc.joblib", payload)
    assert uri == f"{store.root}/models/run-1/svc.joblib"
    assert store.exists("models/run-1/svc.joblib")
    assert store.exists(uri)
    assert store.get_bytes("models/run-1/svc.joblib") == payload
    assert store.get_bytes(uri) == payload
    assert not store.exists("models/run-1/other.joblib")
    # Overwrite replaces.
    store.put_bytes("models/run-1/svc.joblib", b"v2")
    assert store.get_bytes(uri) == b"v2"


def test_put_file_and_local_copy(store, tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text("a,b\n1,2\n")
    uri = store.put_file("data/rows.csv", source)
    with store.local_copy(uri) as path:
        assert path.is_file()
        assert path.read_text() == "a,b\n1,2\n"
        assert path.name.endswith(".csv")  # readers pick the format from the suffix


def test_put_stream_writes_what_fill_writes(store):
    def fill(out):
        for part in (b"arrow ", b"shard ", b"bytes"):
            out.write(part)

    uri = store.put_stream("batch/run/shards/part-00000.arrow", fill)
    assert uri == store.uri("batch/run/shards/part-00000.arrow")
    assert store.get_bytes(uri) == b"arrow shard bytes"


def test_read_uri_reads_whatever_store_wrote_it(store, s3_env, settings_for):
    uri = store.put_bytes("plots/roc.png", b"\x89PNG...")
    settings = settings_for(s3_env)
    assert ObjectStore.read_uri(uri, settings) == b"\x89PNG..."


def test_missing_object_error_names_the_uri(store):
    uri = store.uri("models/nope.joblib")
    with pytest.raises(StoreError, match="models/nope.joblib") as info:
        store.get_bytes("models/nope.joblib")
    assert uri in str(info.value)
    with pytest.raises(StoreError, match="models/nope.joblib"), store.local_copy(uri):
        pass


def test_read_uri_missing_object_names_the_uri(store, s3_env, settings_for):
    uri = store.uri("data/absent.csv")
    with pytest.raises(StoreError) as info:
        ObjectStore.read_uri(uri, settings_for(s3_env))
    assert uri in str(info.value)


def test_key_of_rejects_other_stores(local_store):
    with pytest.raises(StoreError, match="not inside the store"):
        local_store.key_of("file:///somewhere/else/x.csv")


def test_local_store_writes_are_files_under_its_folder(tmp_path):
    store = ObjectStore.from_url((tmp_path / "store with space").as_uri())
    uri = store.put_bytes("a/b.txt", b"hello")
    assert (tmp_path / "store with space" / "a" / "b.txt").read_bytes() == b"hello"
    assert ObjectStore.read_uri(uri) == b"hello"
    # No temporary files are left beside the object.
    assert sorted(p.name for p in (tmp_path / "store with space" / "a").iterdir()) == ["b.txt"]


def test_s3_store_with_prefix(s3_env, settings_for):
    settings = settings_for(s3_env)
    store = ObjectStore.from_url(s3_env["BATCHSCORE_STORE_URL"] + "/team/project", settings)
    uri = store.put_bytes("data/x.csv", b"1")
    assert uri == s3_env["BATCHSCORE_STORE_URL"] + "/team/project/data/x.csv"
    assert ObjectStore.read_uri(uri, settings) == b"1"


@pytest.mark.parametrize("url", ["ftp://host/path", "gs://bucket", "/just/a/path"])
def test_unsupported_scheme(url):
    with pytest.raises(StoreError, match="unsupported store URL"):
        ObjectStore.from_url(url)


def test_read_uri_unsupported_scheme():
    with pytest.raises(StoreError, match="unsupported object URI"):
        ObjectStore.read_uri("http://example.com/model.joblib")


def test_from_settings_defaults_to_the_home_folder(settings_for, tmp_path):
    settings = settings_for({"BATCHSCORE_HOME": str(tmp_path / "home")})
    store = ObjectStore.from_settings(settings)
    uri = store.put_bytes("k.txt", b"v")
    assert (tmp_path / "home" / "store" / "k.txt").read_bytes() == b"v"
    assert uri.startswith("file:///")


def test_delete(store):
    uri = store.put_bytes("batch/run/shards/part-00000.parquet", b"x")
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting what is gone is not an error


def test_concurrent_writers_of_one_key(local_store, tmp_path):
    # Retried or parallel steps may write the same object: every write must succeed and
    # the object must always be one writer's whole file.
    sources = []
    for i in range(4):
        source = tmp_path / f"src{i}.bin"
        source.write_bytes(bytes([i]) * 100_000)
        sources.append(source)
    errors: list[Exception] = []

    def write(source: Path) -> None:
        for _ in range(20):
            try:
                local_store.put_file("data/shared.bin", source)
                local_store.put_bytes("data/shared2.bin", source.read_bytes())
            except Exception as exc:  # collected, asserted below
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for key in ("data/shared.bin", "data/shared2.bin"):
        data = local_store.get_bytes(key)
        assert len(data) == 100_000 and len(set(data)) == 1
    assert sorted(p.name for p in (tmp_path / "store" / "data").iterdir()) == [
        "shared.bin",
        "shared2.bin",
    ]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_local_store_files_follow_the_umask(tmp_path, umask, mode):
    """Not mkstemp's 0600: a container running as another user must read the store."""
    import os
    import stat

    store = LocalStore((tmp_path / "store").as_uri())
    previous = os.umask(umask)
    try:
        store.put_bytes("models/a.joblib", b"model")
        store.put_stream("data/b.csv", lambda out: out.write(b"x\n"))
    finally:
        os.umask(previous)
    for key in ("models/a.joblib", "data/b.csv"):
        assert stat.S_IMODE((tmp_path / "store" / key).stat().st_mode) == mode, key
    # No temporary file left beside them.
    assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()) == [
        "a.joblib",
        "b.csv",
    ]


def test_failed_local_write_leaves_no_temporary_file(tmp_path):
    store = LocalStore((tmp_path / "store").as_uri())

    def fail(out):
        out.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.put_stream("data/c.csv", fail)
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
