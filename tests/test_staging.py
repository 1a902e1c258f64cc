"""Staging (dicom_node/staging.py) on both object stores: a real series stored through the real
InstanceStore (SQLite: staging uses only the Database and JobStore protocols), staged as its
completion saw it, fetched into another folder byte-identical, a corrupted object detected,
nothing uploaded twice, purges exact. (The time of staging a 300-slice CT is
measured by benchmarks/cluster.py, with the node's own prestage.)"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.errors import ObjectCorrupt, ObjectMissing
from dicom_node.infer import series_input
from dicom_node.jobs import InferencePayload, Job, JobKind, job_store
from dicom_node.objects import ObjectStore
from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.staging import (
    fetch_inputs,
    manifest_key,
    materialize,
    materialize_all,
    prestage_open_series,
    purge_job,
    purge_study,
    stage_job,
    upload_tree,
)
from dicom_node.store import InstanceStore, Sender, store_key
from tests.support.encoding import encoded
from tests.support.jobs import completed_job, put_files
from tests.support.paths import corpus_ct

SENDER = Sender("MODALITY", "127.0.0.1")
ALGORITHM = "lung-nodules-ct"  # the algorithm the jobs are routed to


@dataclass
class Counting:
    """A real store that counts what is written to it (staging twice must write nothing)."""

    inner: ObjectStore
    puts: list[str] = field(default_factory=list)

    def put_file(self, key: str, path: Path) -> None:
        self.puts.append(key)
        self.inner.put_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.inner.put_bytes(key, data)

    def get_file(self, key: str, path: Path) -> None:
        self.inner.get_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def keys(self, prefix: str) -> list[str]:
        return self.inner.keys(prefix)

    def delete_prefix(self, prefix: str) -> int:
        return self.inner.delete_prefix(prefix)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InstanceStore]:
    s = InstanceStore.open(tmp_path / "data", fsync=False)
    yield s
    s.close()


@pytest.fixture
def objects(make_object_store: Callable[[str], ObjectStore]) -> Counting:
    return Counting(make_object_store("node"))


@pytest.fixture
def corpus_series(corpus: Path, store: InstanceStore) -> tuple[list[Path], Job]:
    """The corpus's 30-slice CT stored, completed and routed; then one more slice of it
    received after the completion (a resend), which the job must not see."""
    files = corpus_ct(corpus)
    put_files(store, files, SENDER)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    job = completed_job(store, series_uid, ALGORITHM)
    time.sleep(0.01)  # received strictly after the completion
    late = dcmread(files[0])
    late.SOPInstanceUID = generate_uid()
    syntax = late.file_meta.TransferSyntaxUID
    store.put(encoded(late, syntax), syntax, SENDER)
    return files, job


def test_staged_inputs_come_back_byte_identical_in_the_workers_order(
    store: InstanceStore, corpus_series, objects: Counting, tmp_path: Path
) -> None:
    files, job = corpus_series
    jobs = job_store(store.db)
    manifest = stage_job(job, store.db, jobs, store.data_dir, objects)

    # What the embedded worker would read: the completion's 30 slices, not the late one.
    expected = series_input(store.db, store.data_dir, job.subject_uid, jobs.completed_at(job))
    assert len(expected.paths) == len(files) == 30
    assert [store.data_dir / f.path for f in manifest.inputs["series"]] == list(expected.paths)
    staged = jobs.get(job.id)
    assert staged is not None and staged.staged_at is not None

    # Keys: hashed study, content hash; no UID anywhere in them. The manifest came last.
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    keys = objects.keys("")
    assert keys == sorted([*(f.key for f in manifest.files), manifest_key(job.id)])
    assert all(k.startswith(f"inputs/{store_key(study_uid)}/") for k in keys[:-1])
    assert not [k for k in keys if study_uid in k or job.subject_uid in k]
    assert objects.puts[-1] == manifest_key(job.id)
    recorded = json.loads(objects.get_bytes(manifest_key(job.id)))
    assert recorded["job_id"] == job.id and recorded["series"] == {"series": job.subject_uid}

    scratch = tmp_path / "worker-scratch"
    inputs = fetch_inputs(job.id, objects, scratch)
    assert list(inputs) == ["series"] and inputs["series"].series_uid == job.subject_uid
    fetched = inputs["series"].paths
    assert [p.relative_to(scratch) for p in fetched] == [
        p.relative_to(store.data_dir) for p in expected.paths
    ]
    assert all(
        a.read_bytes() == b.read_bytes() for a, b in zip(fetched, expected.paths, strict=True)
    )
    assert len(inputs["series"].datasets()) == 30  # an algorithm can read them


def test_a_prior_retrieved_after_the_completion_is_staged_whole(
    store: InstanceStore, corpus_series, objects: Counting, tmp_path: Path
) -> None:
    """An input of another study (a prior a follow-up algorithm takes) arrives, when fetched
    from a PACS, after the completion that asked for it: it is staged whole, as the embedded
    worker reads it (infer.prior_input), while the job's own series keeps its completion's
    view."""
    files, job = corpus_series
    prior = list(ct_series(CtPhantomSpec(slices=3, rows=16, columns=16)))
    for ds in prior:
        store.put(
            encoded(ds, ds.file_meta.TransferSyntaxUID), ds.file_meta.TransferSyntaxUID, SENDER
        )
    jobs = job_store(store.db)
    payload = InferencePayload(
        ALGORITHM, {"series": job.subject_uid, "prior": str(prior[0].SeriesInstanceUID)}, "series"
    )
    with store.db.transaction() as conn:
        job_id = jobs.enqueue(conn, JobKind.INFERENCE, job.subject_uid, 1, payload)
    following = jobs.get(job_id)
    assert following is not None
    manifest = stage_job(following, store.db, jobs, store.data_dir, objects)
    assert len(manifest.inputs["series"]) == len(files) == 30  # not the late slice
    assert len(manifest.inputs["prior"]) == 3
    inputs = fetch_inputs(job_id, objects, tmp_path / "scratch")
    assert len(inputs["prior"].datasets()) == 3


def test_a_corrupted_object_is_detected(
    store: InstanceStore, corpus_series, objects: Counting, tmp_path: Path
) -> None:
    _, job = corpus_series
    manifest = stage_job(job, store.db, job_store(store.db), store.data_dir, objects)
    victim = manifest.inputs["series"][7]
    damaged = bytearray(objects.get_bytes(victim.key))
    damaged[-1] ^= 0xFF  # one bit of one pixel
    objects.put_bytes(victim.key, bytes(damaged))
    with pytest.raises(ObjectCorrupt, match=re.escape(victim.key)):
        fetch_inputs(job.id, objects, tmp_path / "scratch")
    assert not (tmp_path / "scratch" / victim.path).exists()


def test_staging_again_uploads_nothing_and_a_second_job_only_its_manifest(
    store: InstanceStore, corpus_series, objects: Counting
) -> None:
    _, job = corpus_series
    jobs = job_store(store.db)
    first = stage_job(job, store.db, jobs, store.data_dir, objects)
    assert len(objects.puts) == 31
    objects.puts.clear()
    again = stage_job(job, store.db, jobs, store.data_dir, objects)
    assert again == first and objects.puts == []
    # Another algorithm on the same series: its inputs are already there, by content.
    other = completed_job(store, job.subject_uid, "brain-tumour-mr")
    second = stage_job(other, store.db, jobs, store.data_dir, objects)
    assert objects.puts == [manifest_key(other.id)]
    assert [f.key for f in second.files] == [f.key for f in first.files]


def test_series_sent_while_open_leave_only_the_manifest_to_staging(
    store: InstanceStore, corpus: Path, objects: Counting
) -> None:
    """Instances go up while their series is open; the completion's staging then writes only
    the manifest. A second pass from the returned mark sends nothing."""
    files = corpus_ct(corpus)
    put_files(store, files[:20], SENDER)
    mark = prestage_open_series(store.db, store.data_dir, objects, 0.0)
    assert len(objects.puts) == 20
    put_files(store, files[20:], SENDER)
    mark = prestage_open_series(store.db, store.data_dir, objects, mark)
    assert len(objects.puts) == 30
    objects.puts.clear()
    assert prestage_open_series(store.db, store.data_dir, objects, mark) == mark
    assert objects.puts == []

    job = completed_job(
        store, str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), ALGORITHM
    )
    stage_job(job, store.db, job_store(store.db), store.data_dir, objects)
    assert objects.puts == [manifest_key(job.id)]


def test_results_go_up_and_the_node_materializes_them(
    make_object_store: Callable[[str], ObjectStore], tmp_path: Path
) -> None:
    node_store, worker_store = make_object_store("p"), make_object_store("p")
    scratch = tmp_path / "scratch"
    attempt = scratch / "results" / "12" / "attempt-2"
    (attempt / "dicom").mkdir(parents=True)
    (attempt / "result.json").write_text('{"findings": []}')
    (attempt / "dicom" / "seg.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 300)
    keys = upload_tree(attempt, worker_store, scratch)
    assert keys == ["results/12/attempt-2/dicom/seg.dcm", "results/12/attempt-2/result.json"]

    data_dir = tmp_path / "node-data"
    local = materialize("results/12/attempt-2/dicom/seg.dcm", data_dir, node_store)
    assert local == data_dir / "results/12/attempt-2/dicom/seg.dcm"
    assert local.read_bytes() == (attempt / "dicom" / "seg.dcm").read_bytes()
    elsewhere = materialize_all(keys, tmp_path / "other-node", node_store)
    assert [p.read_bytes() for p in elsewhere] == [(scratch / k).read_bytes() for k in keys]
    # A local copy is used as it is: the object is not read again.
    node_store.delete_prefix("results/12/")
    assert materialize("results/12/attempt-2/dicom/seg.dcm", data_dir, node_store) == local
    with pytest.raises(ObjectMissing, match=r"result\.json"):
        materialize("results/12/attempt-2/result.json", data_dir, node_store)
    assert not (data_dir / "results/12/attempt-2/result.json").exists()
    with pytest.raises(ValueError, match="inside the data folder"):
        materialize("../outside", data_dir, node_store)


def test_purges_remove_exactly_their_prefixes(
    store: InstanceStore, corpus_series, objects: Counting, tmp_path: Path
) -> None:
    files, job = corpus_series
    jobs = job_store(store.db)
    stage_job(job, store.db, jobs, store.data_dir, objects)
    # Another study (a phantom), and results of this job and of job 10x its number.
    phantom = list(ct_series(CtPhantomSpec(slices=3, rows=32, columns=32)))
    for ds in phantom:
        store.put(encoded(ds), "1.2.840.10008.1.2.1", SENDER)
    other = completed_job(store, str(phantom[0].SeriesInstanceUID), ALGORITHM)
    stage_job(other, store.db, jobs, store.data_dir, objects)
    for job_id in (job.id, job.id * 10, other.id):
        objects.put_bytes(f"results/{job_id}/attempt-1/result.json", b"{}")
    before = set(objects.keys(""))

    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert purge_study(study_uid, objects) == 30
    assert purge_job(job.id, objects) == 2  # its manifest and its results
    gone = before - set(objects.keys(""))
    assert gone == {
        *(k for k in before if k.startswith(f"inputs/{store_key(study_uid)}/")),
        manifest_key(job.id),
        f"results/{job.id}/attempt-1/result.json",
    }
    assert len(objects.keys("inputs/")) == 3
    assert purge_study(study_uid, objects) == 0 and purge_job(job.id, objects) == 0
