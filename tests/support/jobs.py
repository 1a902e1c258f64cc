"""Jobs queued straight into a real database (SQLite, or PostgreSQL for the job store's
contract tests), for tests of the queue itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.database import Database, SqliteDatabase
from dicom_node.jobs import CompletionPayload, InferencePayload, Job, JobKind, job_store
from dicom_node.store import InstanceStore, Sender
from tests.support.dicomfiles import dataset_bytes

OpenDatabase = Callable[[], Database]

# The databases the job store runs on; its contract tests run on each (PostgreSQL on a real
# server: tests/support/postgres.py).
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenDatabase]:
    """A fresh, empty database of each backend: a function that opens a new connection to it
    (one per simulated worker process); all are closed at the end. A test module using it
    imports it, and ``postgres_server`` and ``postgres_url`` (tests/support/postgres.py), as
    fixtures."""
    if request.param == "postgresql":
        from dicom_node.database_postgres import PostgresDatabase

        url = request.getfixturevalue("postgres_url")

        def make() -> Database:
            return PostgresDatabase(url)
    else:

        def make() -> Database:
            return SqliteDatabase(tmp_path / "index.sqlite3")

    opened: list[Database] = []

    def open_one() -> Database:
        opened.append(make())
        return opened[-1]

    try:
        yield open_one
    finally:
        for db in opened:
            db.close()


def queue(db: Database, *algorithms: str) -> list[int]:
    """One queued inference job per algorithm named, in this order, each on a series of its
    own (never stored); their IDs."""
    store = job_store(db)
    with db.transaction() as conn:
        return [
            store.enqueue(
                conn,
                JobKind.INFERENCE,
                f"1.2.3.{n}",
                1,
                InferencePayload(name, {"series": f"1.2.3.{n}"}, "series"),
            )
            for n, name in enumerate(algorithms)
        ]


def put_files(store: InstanceStore, files: list[Path], sender: Sender) -> None:
    """Store each file through the real InstanceStore, as a C-STORE from ``sender`` does."""
    for path in files:
        syntax, data = dataset_bytes(path)
        store.put(data, syntax, sender)


def completed_job(store: InstanceStore, series_uid: str, algorithm: str) -> Job:
    """The series' completion and an inference job routed from it, as assembly and route
    record them (one transaction)."""
    jobs = job_store(store.db)
    with store.db.transaction() as conn:
        jobs.enqueue(
            conn,
            JobKind.SERIES_COMPLETE,
            series_uid,
            1,
            CompletionPayload("series", series_uid, 0, "quiet", 0.0),
        )
        job_id = jobs.enqueue(
            conn,
            JobKind.INFERENCE,
            series_uid,
            1,
            InferencePayload(algorithm, {"series": series_uid}, "series"),
        )
    job = jobs.get(job_id)
    assert job is not None
    return job


def add_open_series(db: Database, received_at: float) -> None:
    """A study with one series, last received at ``received_at`` and not yet complete."""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO studies (study_uid, study_key, first_received, last_received)"
            " VALUES ('1.2', 'k1', ?, ?)",
            (received_at, received_at),
        )
        conn.execute(
            "INSERT INTO series (series_uid, series_key, study_uid, first_received,"
            " last_received) VALUES ('1.2.3', 'k2', '1.2', ?, ?)",
            (received_at, received_at),
        )
