"""Retention in cluster mode (issue 17): a study's staged inputs and a job's manifest and
results leave the object store with the local files, under the same rules. Real PostgreSQL and
SeaweedFS; the retention function on the node's PostgresDatabase, as the node's loop calls it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.assembly import Assembler
from dicom_node.config import AssemblyConfig, ObjectsConfig, RetentionConfig
from dicom_node.database import RESULTS_DIR
from dicom_node.database_postgres import PostgresDatabase
from dicom_node.errors import ObjectStoreUnavailable
from dicom_node.jobs import JobKind, job_store
from dicom_node.loops import Loop
from dicom_node.objects import ObjectStore, object_store
from dicom_node.retention import purge_expired
from dicom_node.route import Decision, Routed, record_decision
from dicom_node.staging import stage_job, upload_tree
from dicom_node.store import InstanceStore, Sender
from dicom_node.testing import free_port
from tests.support.dicomfiles import dataset_bytes
from tests.support.postgres import postgres_server, postgres_url
from tests.support.seaweedfs import SeaweedServer

__all__ = ["postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.integration  # PostgreSQL and SeaweedFS server processes

SENDER = Sender("MODALITY", "127.0.0.1")
NOW_AND_LATER = RetentionConfig(instances_hours=0, results_hours=0)


def _delivered_job(
    db: PostgresDatabase, store: InstanceStore, objects: ObjectStore, files: list[Path]
) -> tuple[str, int, int]:
    """A received, completed, routed study with two inference jobs, both staged: one ran on
    a "worker" (its results uploaded) and was committed with one pending delivery, the other
    failed after uploading part of its results: (study UID, the job's id, the failed one's)."""
    assembler = Assembler(db, AssemblyConfig())
    assembler.association_opened(1)
    for path in files:
        syntax, data = dataset_bytes(path)
        assembler.instance_stored(1, store.put(data, syntax, SENDER))
    completions = assembler.association_ended(1, released=True)
    series = next(c for c in completions if c.level.value == "series")
    jobs = job_store(db)
    decision = Decision(
        "series",
        series.uid,
        series.generation,
        [
            Routed("example", {"series": series.uid}, destinations=("pacs",)),
            Routed("other", {"series": series.uid}, destinations=("pacs",)),
        ],
    )
    with db.transaction() as conn:
        job_id, failing_id = record_decision(conn, jobs, decision)
    for staged in jobs.unstaged():
        stage_job(staged, db, jobs, store.data_dir, objects)
    job = jobs.get(job_id)
    assert job is not None
    while (claimed := jobs.claim("worker-host-1")) is not None:
        if claimed.kind != JobKind.INFERENCE:
            jobs.succeed(claimed.id)
        elif claimed.id == failing_id:
            # The other job's attempt uploaded a file, then failed: no results, ever.
            partial = store.data_dir / RESULTS_DIR / str(failing_id) / "attempt-1"
            partial.mkdir(parents=True)
            (partial / "partial.dcm").write_bytes(b"half")
            upload_tree(partial, objects, store.data_dir)
            jobs.fail(
                failing_id, "boom", worker="worker-host-1", max_attempts=1, token=claimed.token
            )
    attempt = store.data_dir / RESULTS_DIR / str(job_id) / "attempt-1"
    attempt.mkdir(parents=True)
    (attempt / "result.json").write_text("{}")
    upload_tree(attempt, objects, store.data_dir)
    with db.transaction() as conn:
        jobs.mark_succeeded(conn, job_id)
        conn.execute(
            "INSERT INTO results (job_id, algorithm, path, created_at) VALUES (?, ?, ?, ?)",
            (job_id, "example", f"{RESULTS_DIR}/{job_id}/attempt-1/result.json", time.time()),
        )
        jobs.schedule_deliveries(conn, job_id, job.inference)
    with db.reading() as conn:
        study_uid = conn.execute("SELECT study_uid FROM studies").fetchone()[0]
    return study_uid, job_id, failing_id


def test_retention_purges_the_object_store_with_the_local_files(
    tmp_path: Path, postgres_url: str, seaweedfs: SeaweedServer, corpus: Path
) -> None:
    """Nothing goes while the job's delivery is pending; a failing object store is a failed
    step the retention loop backs off from, with every local file and no purge record left;
    once it answers, the study's inputs (and the failed job's manifest and upload, which no
    results rule reaches) and the job's manifest and results go from both places and both
    purges are recorded."""
    db = PostgresDatabase(postgres_url)
    store = InstanceStore(tmp_path / "data", db)
    bucket = seaweedfs.bucket()
    objects = object_store(ObjectsConfig(**seaweedfs.settings(f"s3://{bucket}/node")))
    try:
        files = sorted(p for p in (corpus / "brain-mr-sag-anon").rglob("*") if p.is_file())[:2]
        study_uid, job_id, failed_id = _delivered_job(db, store, objects, files)
        staged = objects.keys("")
        assert {key.split("/")[0] for key in staged} == {"inputs", "jobs", "results"}
        # Both jobs' manifests, the results of one and the failed attempt's upload of the other.
        assert {key for key in staged if not key.startswith("inputs/")} == {
            f"jobs/{job_id}/manifest.json",
            f"jobs/{failed_id}/manifest.json",
            f"results/{job_id}/attempt-1/result.json",
            f"results/{failed_id}/attempt-1/partial.dcm",
        }
        local = [
            *sorted(p for p in (store.data_dir / "instances").rglob("*.dcm")),
            store.data_dir / RESULTS_DIR / str(job_id) / "attempt-1" / "result.json",
        ]
        assert all(p.is_file() for p in local)

        # The delivery is pending: retention leaves everything where it is.
        later = time.time() + 1
        assert purge_expired(db, store.data_dir, NOW_AND_LATER, later, objects=objects) == 0
        assert objects.keys("") == staged and all(p.is_file() for p in local)

        jobs = job_store(db)
        (delivery,) = jobs.due_deliveries(later)
        jobs.delivery_sent(delivery.id, time.time())

        # The object store is down (nothing listens there): the loop's step fails as a
        # Transient error and backs off; nothing local went and nothing is recorded.
        down = object_store(
            ObjectsConfig(
                **{
                    **seaweedfs.settings(f"s3://{bucket}/node"),
                    "endpoint_url": f"http://127.0.0.1:{free_port()}",
                }
            )
        )
        loop = Loop(
            "retention",
            lambda: bool(
                purge_expired(db, store.data_dir, NOW_AND_LATER, time.time() + 1, objects=down)
            ),
            60,
        )
        assert loop.run_once() > 0
        backing_off = loop.state.backing_off
        assert backing_off is not None and ObjectStoreUnavailable.__name__ in backing_off
        assert all(p.is_file() for p in local) and objects.keys("") == staged
        with db.reading() as conn:
            assert conn.execute("SELECT COUNT(*) FROM purges").fetchone()[0] == 0

        # The store answers: the study and the job go from both places, recorded once each.
        assert purge_expired(db, store.data_dir, NOW_AND_LATER, time.time() + 1, objects=objects)
        assert objects.keys("") == []
        assert not any(p.exists() for p in local)
        with db.reading() as conn:
            purged = {r["subject"]: r["files"] for r in conn.execute("SELECT * FROM purges")}
        assert purged == {f"study:{study_uid}": len(files), f"job:{job_id}": 1}
    finally:
        store.close()
