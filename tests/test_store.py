"""The instance store on its own: file meta, the repeated-UID rule, refusals, leftovers."""

from __future__ import annotations

import sqlite3
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.errors import InvalidInstance, OutOfResources, SopMismatch
from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.store import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    InstanceStore,
    Sender,
    StoreResult,
    encode_file_meta,
    validate_uid,
)
from tests.support.encoding import encoded

pytestmark = pytest.mark.unit

SENDER = Sender("MODALITY", "127.0.0.1")


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    s = InstanceStore.open(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def slices():
    return list(ct_series(CtPhantomSpec(slices=3, rows=16, columns=16)))


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "aet"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "CT"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.45", "ODDAE"),  # odd lengths get padded
    ],
)
def test_file_meta_matches_pydicom(sop_class, sop_instance, aet) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = aet
    reference = BytesIO()
    reference.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(reference, meta, enforce_standard=True)
    ours = encode_file_meta(sop_class, sop_instance, ImplicitVRLittleEndian, aet)
    assert ours == reference.getvalue()


def test_stored_file_is_part10_with_the_data_set_as_received(store, slices) -> None:
    data = encoded(slices[0], ImplicitVRLittleEndian)
    stored = store.put(data, ImplicitVRLittleEndian, SENDER)
    assert stored.result is StoreResult.STORED
    ds = dcmread(stored.path)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert ds.SOPInstanceUID == slices[0].SOPInstanceUID
    assert stored.path.read_bytes().endswith(data)
    # Named by hashes, under the data folder.
    assert stored.path.is_relative_to(store.instances_dir)
    assert slices[0].SOPInstanceUID not in str(stored.path)


def test_repeated_uid_rule(store, slices) -> None:
    first = encoded(slices[0])
    assert store.put(first, ExplicitVRLittleEndian, SENDER).result is StoreResult.STORED
    again = store.put(first, ExplicitVRLittleEndian, SENDER)
    assert again.result is StoreResult.DUPLICATE and not again.series_reopened
    changed = slices[0]
    changed.SeriesDescription = "CORRECTED"
    replaced = store.put(encoded(changed), ExplicitVRLittleEndian, SENDER)
    assert replaced.result is StoreResult.REPLACED
    assert dcmread(replaced.path).SeriesDescription == "CORRECTED"
    with store.db.reading() as conn:
        assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1


def test_replacement_in_another_series_removes_the_old_file(store, slices) -> None:
    old = store.put(encoded(slices[0]), ExplicitVRLittleEndian, SENDER)
    moved = slices[0]
    moved.SeriesInstanceUID = "1.2.3.999"
    new = store.put(encoded(moved), ExplicitVRLittleEndian, SENDER)
    assert new.result is StoreResult.REPLACED
    assert not old.path.exists() and new.path.exists()


@pytest.mark.parametrize(
    "value", ["", None, "../../etc/x", "1.2.3.", "01.2", "1.2.a", "1." + "2" * 70, "1.2\\3.4"]
)
def test_invalid_uids(value) -> None:
    with pytest.raises(InvalidInstance):
        validate_uid(value, "SOPInstanceUID")


def test_refusals_leave_nothing_behind(store, slices, tmp_path: Path) -> None:
    with pytest.raises(InvalidInstance):
        store.put(b"\x08\x00\x16\x00garbage that is not a data set", ExplicitVRLittleEndian, SENDER)
    with pytest.raises(SopMismatch):
        store.put(
            encoded(slices[0]), ExplicitVRLittleEndian, SENDER, expected_sop_instance_uid="1.2.3"
        )
    full = InstanceStore(store.data_dir, store.db, min_free_bytes=2**62)
    with pytest.raises(OutOfResources, match=r"store\.min_free_bytes"):
        full.put(encoded(slices[1]), ExplicitVRLittleEndian, SENDER)
    assert list(store.tmp_dir.iterdir()) == []
    assert not list(store.instances_dir.rglob("*.dcm"))


def test_deeply_nested_sequences_are_refused_not_crashing(store) -> None:
    # A sequence nested thousands deep makes pydicom raise RecursionError.
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1115), undefined length
    with pytest.raises(InvalidInstance):
        store.put((sequence + item_start) * 5000, ExplicitVRLittleEndian, SENDER)


def test_leftover_partial_files_are_removed_at_start(store, slices) -> None:
    (store.tmp_dir / "interrupted.part").write_bytes(b"half an instance")
    reopened = InstanceStore(store.data_dir, store.db)
    assert list(reopened.tmp_dir.iterdir()) == []


def test_concurrent_puts_share_commits_and_each_gets_its_own_outcome(
    store: InstanceStore,
) -> None:
    """Eight threads storing at once: every row committed, some commits carry several rows
    (group commit), and each put learns whether it reopened its series on its own."""
    import threading

    batches: list[int] = []
    commit = store._commit_arrivals

    def counted(arrivals):  # the store's own commit, its batch sizes recorded
        batches.append(len(arrivals))
        return commit(arrivals)

    store._committer._commit = counted
    datasets = list(ct_series(CtPhantomSpec(slices=40, rows=16, columns=16)))
    start = threading.Barrier(8)
    results = []

    def put_share(share: list) -> None:
        start.wait()
        for ds in share:
            results.append(store.put(encoded(ds), ExplicitVRLittleEndian, SENDER))

    threads = [threading.Thread(target=put_share, args=(datasets[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.result for r in results] == [StoreResult.STORED] * 40
    assert sum(batches) == 40 and max(batches) > 1, batches
    with store.db.reading() as conn:
        assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 40
    assert not any(r.series_reopened for r in results)


def test_a_failed_group_commit_fails_every_put_in_it_and_keeps_no_file(
    store: InstanceStore, slices
) -> None:
    def failing(arrivals):
        raise sqlite3.OperationalError("disk I/O error")

    store._committer._commit = failing
    with pytest.raises(OutOfResources, match="index database failed"):
        store.put(encoded(slices[0]), ExplicitVRLittleEndian, SENDER)
    assert not list((store.data_dir / "instances").rglob("*.dcm"))
    assert not list(store.tmp_dir.iterdir())
