"""The object store's contract, on both implementations: S3 (a real SeaweedFS started by the
tests, tests/support/seaweedfs.py) and a shared folder. Every test of the contract runs on each;
the outage tests stop the real server (or unmount the folder, as far as a test can)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.config import ObjectsConfig
from dicom_node.errors import ObjectMissing, ObjectStoreRefused, ObjectStoreUnavailable
from dicom_node.objects import (
    FolderObjectStore,
    ObjectStore,
    S3ObjectStore,
    check_key,
    object_store,
)
from tests.support.paths import corpus_ct
from tests.support.seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer


@pytest.fixture
def store(make_object_store: Callable[[str], ObjectStore]) -> ObjectStore:
    return make_object_store("dicom-node")


def test_real_files_round_trip_byte_identical(store: ObjectStore, corpus: Path, tmp_path):
    files = corpus_ct(corpus)
    for n, path in enumerate(files):
        store.put_file(f"inputs/study/{n:03d}", path)
    for n, path in enumerate(files):
        copy = tmp_path / "copy" / f"{n:03d}.dcm"
        store.get_file(f"inputs/study/{n:03d}", copy)
        assert copy.read_bytes() == path.read_bytes()
        assert store.get_bytes(f"inputs/study/{n:03d}") == path.read_bytes()
    assert not [p for p in (tmp_path / "copy").iterdir() if p.name.startswith(".")]


def test_a_file_larger_than_a_part_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    """Above 16 MB the S3 store uploads in parts; the object is still one, whole."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * 2**20 + 12345))
    store.put_file("results/1/attempt-1/big.bin", big)
    store.get_file("results/1/attempt-1/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_keys_are_listed_by_string_prefix(store: ObjectStore) -> None:
    for key in ("a/b/1", "a/b/2", "a/bc/3", "a/c", "d/e"):
        store.put_bytes(key, key.encode())
    assert store.keys("a/b/") == ["a/b/1", "a/b/2"]
    assert store.keys("a/b") == ["a/b/1", "a/b/2", "a/bc/3"]
    assert store.keys("") == ["a/b/1", "a/b/2", "a/bc/3", "a/c", "d/e"]
    assert store.keys("x/") == []
    assert store.exists("a/c") and not store.exists("a/b")


def test_delete_prefix_removes_exactly_the_prefix(store: ObjectStore) -> None:
    for key in ("jobs/1/manifest.json", "jobs/12/manifest.json", "jobs/1/x/y", "results/1/r"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("jobs/1/") == 2
    assert store.keys("") == ["jobs/12/manifest.json", "results/1/r"]
    assert store.delete_prefix("jobs/1/") == 0
    with pytest.raises(ValueError, match="whole store"):
        store.delete_prefix("")


def test_prefixes_of_one_bucket_do_not_see_each_other(make_object_store) -> None:
    node, other = make_object_store("site-a"), make_object_store("site-b")
    node.put_bytes("jobs/1/manifest.json", b"a")
    other.put_bytes("jobs/1/manifest.json", b"b")
    assert node.keys("") == ["jobs/1/manifest.json"]
    assert node.get_bytes("jobs/1/manifest.json") == b"a"
    assert other.delete_prefix("jobs/") == 1
    assert node.get_bytes("jobs/1/manifest.json") == b"a"


def test_a_put_replaces_the_object(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"first, and longer")
    store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"second"
    (tmp_path / "f").write_bytes(b"third")
    store.put_file("k", tmp_path / "f")
    assert store.get_bytes("k") == b"third"
    assert store.keys("") == ["k"]


def test_a_missing_object_is_named_and_leaves_no_file(store: ObjectStore, tmp_path: Path):
    with pytest.raises(ObjectMissing, match="'inputs/none'"):
        store.get_bytes("inputs/none")
    target = tmp_path / "out" / "x.dcm"
    with pytest.raises(ObjectMissing, match="'inputs/none'"):
        store.get_file("inputs/none", target)
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    # A failed get leaves what was there before untouched.
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"earlier copy")
    with pytest.raises(ObjectMissing):
        store.get_file("inputs/none", target)
    assert target.read_bytes() == b"earlier copy"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


@pytest.mark.parametrize("key", ["", "/a", "a//b", "a/../b", ".hidden", "a/.b", "a\\b", "a\nb"])
def test_keys_that_are_not_plain_relative_paths_are_refused(store: ObjectStore, key: str):
    with pytest.raises(ValueError, match="object key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="object key"):
        check_key(key)


# --- outages --------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_outage_fails_within_seconds_and_recovers(tmp_path: Path) -> None:
    """kill -9 of SeaweedFS: each call fails as ObjectStoreUnavailable (Transient) at once,
    not after minutes of boto3's default retries; after a restart with its data the same
    store object works again and the objects written before are there."""
    server = SeaweedServer(tmp_path / "seaweedfs").start()
    try:
        store = object_store(ObjectsConfig(**server.settings("s3://outage/node")), create=True)
        store.put_bytes("inputs/s/before", b"before")
        server.kill()
        calls: list[tuple[str, Callable[[], object]]] = [
            ("put_bytes", lambda: store.put_bytes("inputs/s/during", b"x")),
            ("put_file", lambda: store.put_file("inputs/s/f", tmp_path / "seaweedfs/weed.log")),
            ("get_bytes", lambda: store.get_bytes("inputs/s/before")),
            ("get_file", lambda: store.get_file("inputs/s/before", tmp_path / "out" / "b")),
            ("exists", lambda: store.exists("inputs/s/before")),
            ("keys", lambda: store.keys("inputs/")),
            ("delete_prefix", lambda: store.delete_prefix("inputs/")),
        ]
        for name, call in calls:
            started = time.monotonic()
            with pytest.raises(ObjectStoreUnavailable, match="S3ObjectStore"):
                call()
            print(f"{name} failed after {time.monotonic() - started:.2f} s with the store down")
        assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
        server.start()
        assert store.get_bytes("inputs/s/before") == b"before"
        store.put_bytes("inputs/s/after", b"after")
        assert store.keys("inputs/") == ["inputs/s/after", "inputs/s/before"]

        # Frozen (SIGSTOP): connections are accepted and never answered; the read timeout,
        # not a refused connection, ends the call (1 s here, so that the test is short).
        impatient = S3ObjectStore(
            "s3://outage/node",
            endpoint_url=server.endpoint_url,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            read_timeout_s=1.0,
            attempts=2,
        )
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ObjectStoreUnavailable, match="timeout"):
                impatient.get_bytes("inputs/s/before")
            print(f"frozen store: failed after {time.monotonic() - started:.2f} s")
        finally:
            os.killpg(server.proc.pid, signal.SIGCONT)
        assert impatient.get_bytes("inputs/s/before") == b"before"
    finally:
        server.kill()


@pytest.mark.integration
def test_s3_bucket_missing_or_created(seaweedfs: SeaweedServer) -> None:
    settings = seaweedfs.settings("s3://never-created/p")
    store = object_store(ObjectsConfig(**settings))
    with pytest.raises(ObjectStoreRefused, match="never-created"):
        store.put_bytes("k", b"x")
    settings = seaweedfs.settings("s3://created-on-start")
    made = object_store(ObjectsConfig(**settings), create=True)
    made.put_bytes("k", b"x")
    # A second host creating it again finds it there.
    again = object_store(ObjectsConfig(**settings), create=True)
    assert isinstance(again, S3ObjectStore) and again.get_bytes("k") == b"x"


@pytest.mark.unit
def test_folder_not_mounted_is_unavailable_not_filled(tmp_path: Path) -> None:
    """A shared folder that is not there (its mount gone) is an outage: a worker's store does
    not create it on the host's own disk, where other hosts would never see the objects."""
    store = object_store(ObjectsConfig(url=f"file://{tmp_path}/mnt/shared"))
    assert isinstance(store, FolderObjectStore)
    with pytest.raises(ObjectStoreUnavailable, match="not mounted"):
        store.put_bytes("inputs/s/x", b"x")
    assert not (tmp_path / "mnt").exists()
    (tmp_path / "mnt" / "shared").mkdir(parents=True)
    store.put_bytes("inputs/s/x", b"x")
    assert store.get_bytes("inputs/s/x") == b"x"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "message"),
    [("s3://", "not an s3://bucket/prefix"), ("file://host/x", "not a file:///path")],
)
def test_unusable_urls_are_refused(url: str, message: str) -> None:
    config = ObjectsConfig.model_construct(url=url)  # past the config's own check
    with pytest.raises(ValueError, match=message):
        object_store(config)
