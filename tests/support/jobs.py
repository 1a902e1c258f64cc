"""Jobs queued straight into a real SQLite index, for tests of the queue itself."""

from __future__ import annotations

from dicom_node.database import Database
from dicom_node.jobs import InferencePayload, JobKind, SqliteJobStore


def queue(db: Database, *algorithms: str) -> list[int]:
    """One queued inference job per algorithm named, in this order, each on a series of its
    own (never stored); their IDs."""
    store = SqliteJobStore(db)
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
