"""The job store's cancel and requeue (issue 16, item 4): what a cancelled job is to the
claim, to the worker that was running it, and to a database made before the state existed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_node.database import SqliteDatabase
from dicom_node.jobs import JobKind, JobState, SqliteJobStore, job_store
from tests.support.jobs import OpenDatabase, backend, queue
from tests.support.postgres import postgres_server, postgres_url

__all__ = ["backend", "postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.unit


def test_a_cancelled_job_is_never_claimed_and_its_worker_no_longer_holds_it(
    backend: OpenDatabase,
) -> None:
    db = backend()
    store = job_store(db)
    first, second = queue(db, "a", "a")
    claimed = store.claim("w", (JobKind.INFERENCE,))
    assert claimed is not None and claimed.id == first
    was = store.cancel(second, "alice")
    assert was is not None and was.state is JobState.QUEUED
    assert store.claim("w2", (JobKind.INFERENCE,)) is None  # the only queued one is cancelled

    was = store.cancel(first, "bob")
    assert was is not None and was.state is JobState.RUNNING
    with db.transaction() as conn:
        assert not store.holds(conn, first, "w")  # the worker's commit is refused
    # Its late failure does not end the job a second time, nor queue it again.
    assert store.fail(first, "boom", worker="w", max_attempts=3) is None
    job = store.get(first)
    assert job is not None and job.state is JobState.CANCELLED
    assert job.worker == "w"  # which worker was running it, for its supervisor
    assert job.error == "cancelled by bob while it ran"
    assert store.cancel(first, "bob") is None  # ended: nothing to cancel
    assert store.cancel(12345, "bob") is None
    assert store.counts()[JobState.CANCELLED] == 2


def test_requeue_gives_a_failed_or_cancelled_job_all_its_attempts_again(
    backend: OpenDatabase,
) -> None:
    db = backend()
    store = job_store(db)
    (job_id,) = queue(db, "a")
    assert store.requeue(job_id, "alice") is None  # queued: nothing to requeue
    store.claim("w", (JobKind.INFERENCE,))
    assert store.fail(job_id, "bad", worker="w", max_attempts=1) is JobState.FAILED
    was = store.requeue(job_id, "alice")
    assert was is not None and was.state is JobState.FAILED
    job = store.get(job_id)
    assert job is not None and job.state is JobState.QUEUED
    assert (job.attempts, job.worker, job.token, job.started_at, job.finished_at) == (0,) + (
        None,
    ) * 4
    assert job.error == "requeued by alice after: bad"
    claimed = store.claim("w", (JobKind.INFERENCE,))
    assert claimed is not None and claimed.id == job_id and claimed.attempts == 1
    with db.transaction() as conn:
        store.mark_succeeded(conn, job_id)
    assert store.requeue(job_id, "alice") is None  # succeeded: its deliveries are replayed


def test_a_database_made_before_cancelled_existed_takes_it(tmp_path: Path) -> None:
    """SQLite cannot change a CHECK constraint: the jobs table of an older node is rebuilt at
    open, its rows, IDs and indexes kept."""
    path = tmp_path / "index.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
        " subject_uid TEXT NOT NULL, generation INTEGER NOT NULL, payload TEXT NOT NULL,"
        " state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),"
        " attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, error TEXT,"
        " created_at REAL NOT NULL, started_at REAL, finished_at REAL);"
        "CREATE INDEX jobs_by_state ON jobs(state, id);"
        "INSERT INTO jobs (kind, subject_uid, generation, payload, state, created_at) VALUES"
        " ('inference', '1.2', 1,"
        ' \'{"algorithm": "a", "inputs": {"series": "1.2"}, "level": "series"}\','
        " 'queued', 1000);"
    )
    old.close()
    db = SqliteDatabase(path)
    store = SqliteJobStore(db)
    was = store.cancel(1, "alice")
    assert was is not None and was.subject_uid == "1.2" and was.created_at == 1000
    (new,) = queue(db, "a")
    assert new == 2
    with db.reading() as conn:
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    assert "jobs_by_state" in indexes
    db.close()
    SqliteDatabase(path).close()  # opened again: nothing left to rebuild
