"""Series/study completion, reopening, the job store and its crash recovery, `status`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.assembly import Assembler, Level
from dicom_node.config import AssemblyConfig
from dicom_node.database import SqliteDatabase, database_path
from dicom_node.jobs import (
    CompletionPayload,
    InferencePayload,
    JobKind,
    JobState,
    SqliteJobStore,
)
from dicom_node.phantoms import CtPhantomSpec, ct_series
from tests.support.jobs import add_open_series
from tests.support.node import NodeProcess

SLOW = {"assembly": {"series_quiet_seconds": 120, "study_quiet_seconds": 120}}
FAST = {"assembly": {"series_quiet_seconds": 1, "study_quiet_seconds": 1}}


def associate(node: NodeProcess, aet: str = "MODALITY"):
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def store_all(assoc, datasets) -> None:
    for ds in datasets:
        assert int(assoc.send_c_store(ds).Status) == 0


def series_state(node: NodeProcess, series_uid: str):
    return node.query(
        "SELECT completed_at, completions FROM series WHERE series_uid = ?", (series_uid,)
    )[0]


def jobs(node: NodeProcess, kind: str = "series-complete") -> list:
    return node.query(
        "SELECT id, subject_uid, generation, payload, state FROM jobs WHERE kind = ? ORDER BY id",
        (kind,),
    )


def small_series(slices: int = 4, **spec) -> list:
    return list(ct_series(CtPhantomSpec(slices=slices, rows=16, columns=16, **spec)))


@pytest.mark.integration
def test_release_completes_series_and_study_with_a_job(make_node) -> None:
    node = make_node(**SLOW)
    series = small_series()
    assoc = associate(node)
    store_all(assoc, series)
    assert series_state(node, series[0].SeriesInstanceUID)["completed_at"] is None
    assoc.release()
    assert node.wait_for("SELECT COUNT(*) FROM jobs", 2) == 2
    (job,) = jobs(node)
    payload = json.loads(job["payload"])
    assert job["subject_uid"] == series[0].SeriesInstanceUID
    assert job["generation"] == 1
    # The router takes the completion job and records a decision for it.
    assert node.wait_for("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'", 2) == 2
    assert node.wait_for("SELECT COUNT(*) FROM routing_decisions", 2) == 2
    assert payload["trigger"] == "association released" and payload["instances"] == 4
    assert payload["completion_latency_s"] < 5
    (study_job,) = jobs(node, "study-complete")
    assert study_job["subject_uid"] == series[0].StudyInstanceUID
    assert "complete (generation 1, 4 instances) by association released" in node.log()


@pytest.mark.integration
def test_series_spread_over_two_open_associations_waits_for_both(make_node) -> None:
    node = make_node(**SLOW)
    series = small_series(6)
    first, second = associate(node, "FIRST"), associate(node, "SECOND")
    store_all(first, series[:3])
    store_all(second, series[3:])
    first.release()
    time.sleep(0.5)
    assert series_state(node, series[0].SeriesInstanceUID)["completed_at"] is None
    assert jobs(node) == []
    second.release()
    assert node.wait_for("SELECT COUNT(*) FROM jobs WHERE kind = 'series-complete'", 1) == 1
    assert json.loads(jobs(node)[0]["payload"])["instances"] == 6


@pytest.mark.integration
def test_quiet_timer_completes_while_the_association_stays_open(make_node) -> None:
    node = make_node(**FAST)
    series = small_series()
    assoc = associate(node)
    store_all(assoc, series)
    assert node.wait_for("SELECT COUNT(*) FROM jobs WHERE kind = 'series-complete'", 1) == 1
    assert json.loads(jobs(node)[0]["payload"])["trigger"] == "quiet timer"
    assoc.release()
    time.sleep(1.5)
    assert len(jobs(node)) == 1  # the release found it complete already: no second event


@pytest.mark.integration
def test_aborted_association_leaves_completion_to_the_quiet_timer(make_node) -> None:
    node = make_node(assembly={"series_quiet_seconds": 2, "study_quiet_seconds": 2})
    series = small_series()
    assoc = associate(node)
    store_all(assoc, series)
    assoc.abort()
    time.sleep(0.5)
    assert jobs(node) == []
    assert node.wait_for("SELECT COUNT(*) FROM jobs WHERE kind = 'series-complete'", 1) == 1
    assert json.loads(jobs(node)[0]["payload"])["trigger"] == "quiet timer"


@pytest.mark.integration
def test_late_instance_reopens_and_completes_again(make_node) -> None:
    node = make_node(**SLOW)
    series = small_series(5)
    assoc = associate(node)
    store_all(assoc, series[:4])
    assoc.release()
    assert node.wait_for("SELECT completions FROM series", 1) == 1
    late = associate(node)
    store_all(late, series[4:])
    state = series_state(node, series[0].SeriesInstanceUID)
    assert state["completed_at"] is None, "a late instance must reopen the series"
    late.release()
    assert node.wait_for("SELECT completions FROM series", 2) == 2
    generations = [(j["generation"], json.loads(j["payload"])["instances"]) for j in jobs(node)]
    assert generations == [(1, 4), (2, 5)]
    # An identical resend is not new data: nothing reopens.
    again = associate(node)
    store_all(again, series[4:])
    again.release()
    time.sleep(0.5)
    assert len(jobs(node)) == 2


@pytest.mark.integration
def test_jobs_left_running_by_a_crash_are_queued_again(make_node) -> None:
    node = make_node(**SLOW)
    # A worker (another process, touching only the job store) claims a job, then the node dies.
    worker_db = SqliteDatabase(database_path(node.data_dir))
    worker_store = SqliteJobStore(worker_db)
    with worker_db.transaction() as conn:
        payload = InferencePayload("example", {"series": "1.2.3"}, "series")
        worker_store.enqueue(conn, JobKind.INFERENCE, "1.2.3", 1, payload)
    claimed = worker_store.claim("worker-1", (JobKind.INFERENCE,))
    worker_db.close()
    assert claimed is not None and claimed.state is JobState.RUNNING and claimed.attempts == 1
    node.kill()
    node.start()
    row = node.query("SELECT state, error, attempts FROM jobs WHERE id = ?", (claimed.id,))[0]
    assert row["state"] == "queued" and "interrupted" in row["error"]
    assert row["attempts"] == 1
    assert "1 job(s) interrupted by the last stop were queued again" in node.log()


@pytest.mark.unit
def test_job_store_claim_fail_retry_succeed(tmp_path) -> None:
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    store = SqliteJobStore(db)
    completed = CompletionPayload("series", "1.2.3", 1, "quiet timer", 0.5)
    with db.transaction() as conn:
        first = store.enqueue(conn, JobKind.SERIES_COMPLETE, "1.2.3", 1, completed)
        second = store.enqueue(
            conn, JobKind.STUDY_COMPLETE, "1.2", 1, CompletionPayload("study", "1.2", 1, "", 0)
        )
    assert store.claim("w", (JobKind.INFERENCE,)) is None
    job = store.claim("w")
    assert job is not None and job.id == first and job.payload == completed
    assert store.fail(job.id, "model crashed", worker="w", max_attempts=2) is JobState.QUEUED
    job = store.claim("w", (JobKind.SERIES_COMPLETE,))
    assert job is not None and job.id == first and job.attempts == 2
    # A failure reported by a worker that no longer holds the job changes nothing.
    assert store.fail(job.id, "late", worker="other", max_attempts=2) is None
    assert store.get(first).state is JobState.RUNNING
    assert store.fail(job.id, "model crashed again", worker="w", max_attempts=2) is JobState.FAILED
    assert store.get(first).error == "model crashed again"
    job = store.claim("w")
    assert job is not None and job.id == second
    store.succeed(job.id)
    assert store.claim("w") is None
    counts = store.counts()
    assert counts[JobState.FAILED] == 1 and counts[JobState.SUCCEEDED] == 1
    db.close()


@pytest.mark.integration
def test_status_reports_senders_completion_and_jobs(make_node) -> None:
    node = make_node(**SLOW)
    for aet in ("CT_SCANNER", "PACS"):
        assoc = associate(node, aet)
        store_all(assoc, small_series(3))
        assoc.release()
    assert node.wait_for("SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'", 4) == 4
    command = [sys.executable, "-m", "dicom_node", "status", "--config", str(node.config_path)]
    report = json.loads(
        subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert report["instances"] == 6 and report["series_complete"] == 2
    assert {s["calling_aet"]: s["instances"] for s in report["senders"]} == {
        "CT_SCANNER": 3,
        "PACS": 3,
    }
    assert all(s["complete"] and s["completion_latency_s"] < 5 for s in report["recent_series"])
    assert report["jobs"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 4,
        "failed": 0,
        "cancelled": 0,
    }
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "CT_SCANNER" in text and "complete x1" in text and "succeeded 4" in text


@pytest.mark.unit
def test_quiet_time_counts_from_the_restart_not_across_the_downtime(tmp_path) -> None:
    """A series cut off by a crash is not complete the moment the node is back: its sender
    gets the whole quiet time to resend the rest first."""
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    add_open_series(db, 1000)
    now = [1100.0]  # back after 100 s down, far past the quiet time since the last instance
    config = AssemblyConfig(series_quiet_seconds=5, study_quiet_seconds=8)
    assembler = Assembler(db, config, clock=lambda: now[0])
    assert assembler.complete_quiet() == []
    now[0] = 1104.9
    assert assembler.complete_quiet() == []
    now[0] = 1105.0
    assert [(c.level, c.generation) for c in assembler.complete_quiet()] == [(Level.SERIES, 1)]
    now[0] = 1108.0
    assert [(c.level, c.generation) for c in assembler.complete_quiet()] == [(Level.STUDY, 1)]
    db.close()


@pytest.mark.integration
def test_a_job_reads_the_instances_its_completion_saw(make_node) -> None:
    """storescu sends one series in one association per transfer syntax: the series completes
    with the first association's instances, is routed on them, and grows before its job runs.
    The job of each completion reads what that completion saw; the later instances are the
    next completion's."""
    from dicom_node.infer import series_input
    from dicom_node.jobs import Job

    node = make_node(**SLOW)
    series = small_series(slices=7)
    for part, completions in ((series[:4], 1), (series[4:], 2)):
        assoc = associate(node)
        store_all(assoc, part)
        assoc.release()
        uid = series[0].SeriesInstanceUID
        done = f"SELECT completions FROM series WHERE series_uid = '{uid}'"
        assert node.wait_for(done, completions) == completions
    db = SqliteDatabase(database_path(node.data_dir))
    try:
        seen = {}
        for generation in (1, 2):
            payload = InferencePayload("example", {"series": uid}, "series")
            job = Job(
                0, "inference", uid, generation, payload, JobState.QUEUED, 0,
                None, None, time.time(), None, None,
            )  # fmt: skip
            received_by = SqliteJobStore(db).completed_at(job)
            seen[generation] = len(series_input(db, node.data_dir, uid, received_by).paths)
    finally:
        db.close()
    assert seen == {1: 4, 2: 7}
