"""The durable job queue: completion events become jobs that workers claim and finish.

Workers touch only this store and the instance store, never the SCP's memory, so that a later
deployment can move them to other processes or machines. :class:`JobStore` is the interface;
:class:`SqliteJobStore` keeps jobs in the node's embedded database.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from dicom_node.database import Database


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobKind(str, Enum):
    SERIES_COMPLETE = "series-complete"
    STUDY_COMPLETE = "study-complete"
    INFERENCE = "inference"  # one routed algorithm on its inputs


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    subject_uid: str
    generation: int
    payload: dict[str, Any]
    state: JobState
    attempts: int
    worker: str | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            kind=row["kind"],
            subject_uid=row["subject_uid"],
            generation=row["generation"],
            payload=json.loads(row["payload"]),
            state=JobState(row["state"]),
            attempts=row["attempts"],
            worker=row["worker"],
            error=row["error"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )


class JobStore(Protocol):
    """What the node and its workers need from a job queue."""

    def claim(self, worker: str, kinds: tuple[str, ...] | None = None) -> Job | None:
        """Atomically move the oldest queued job to ``running`` for ``worker``."""

    def succeed(self, job_id: int) -> None: ...

    def fail(self, job_id: int, error: str, *, worker: str, max_attempts: int) -> JobState | None:
        """Record ``worker``'s failed attempt; requeue while attempts remain, else mark failed.
        None when the job is no longer ``worker``'s (queued again and taken by another)."""

    def requeue_interrupted(self) -> int:
        """Return jobs left ``running`` by a crash to ``queued``; the count moved."""

    def requeue_worker(self, worker: str, error: str, *, max_attempts: int) -> int:
        """Return the jobs a dead worker held; those out of attempts fail. The count moved."""

    def counts(self) -> dict[JobState, int]: ...

    def get(self, job_id: int) -> Job | None: ...


def enqueue(
    conn: sqlite3.Connection,
    kind: JobKind | str,
    subject_uid: str,
    generation: int,
    payload: dict[str, Any],
) -> int:
    """Insert a queued job inside the caller's transaction.

    Callers that record an event (a series completing) enqueue in the same transaction, so an
    event is never recorded without its job, nor a job without its event.
    """
    cursor = conn.execute(
        "INSERT INTO jobs (kind, subject_uid, generation, payload, state, created_at)"
        " VALUES (?, ?, ?, ?, 'queued', ?)",
        (
            str(getattr(kind, "value", kind)),
            subject_uid,
            generation,
            json.dumps(payload),
            time.time(),
        ),
    )
    return int(cursor.lastrowid or 0)


def mark_succeeded(conn: sqlite3.Connection, job_id: int) -> None:
    """Close a job inside the caller's transaction, together with what the job produced."""
    conn.execute(
        "UPDATE jobs SET state = 'succeeded', error = NULL, finished_at = ? WHERE id = ?",
        (time.time(), job_id),
    )


def _end_attempts(
    conn: sqlite3.Connection, where: str, params: tuple, error: str, max_attempts: int
) -> list[JobState]:
    """End the current attempt of the selected jobs: queued again, or failed when out of tries."""
    rows = conn.execute(
        "UPDATE jobs SET state = CASE WHEN attempts >= ? THEN 'failed' ELSE 'queued' END,"
        f" worker = NULL, error = ?, finished_at = ? WHERE {where} RETURNING state",
        (max_attempts, error, time.time(), *params),
    ).fetchall()
    return [JobState(r["state"]) for r in rows]


# The job is running, in the hands of the given worker: a node restart queues running jobs
# again, so an attempt may go on after another worker took the job.
_HELD = "id = ? AND state = 'running' AND worker = ?"


def holds(conn: sqlite3.Connection, job_id: int, worker: str) -> bool:
    """Whether ``worker``'s attempt still holds the job, inside the caller's transaction."""
    return (
        conn.execute(f"SELECT 1 FROM jobs WHERE {_HELD}", (job_id, worker)).fetchone() is not None
    )


class SqliteJobStore:
    """:class:`JobStore` on the node's SQLite database (safe across processes)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def open(cls, path: Path) -> SqliteJobStore:
        return cls(Database(path))

    def claim(self, worker: str, kinds: tuple[str, ...] | None = None) -> Job | None:
        where = "state = 'queued'"
        params: list[Any] = []
        if kinds:
            where += f" AND kind IN ({','.join('?' * len(kinds))})"
            params.extend(kinds)
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?,"
                f" started_at = ? WHERE id = (SELECT id FROM jobs WHERE {where}"
                " ORDER BY id LIMIT 1) RETURNING *",
                (worker, time.time(), *params),
            ).fetchone()
        return Job.from_row(row) if row is not None else None

    def succeed(self, job_id: int) -> None:
        with self.db.transaction() as conn:
            mark_succeeded(conn, job_id)

    def fail(self, job_id: int, error: str, *, worker: str, max_attempts: int) -> JobState | None:
        with self.db.transaction() as conn:
            # Only the attempt that holds the job ends it: a late failure of an attempt that
            # lost the job (its node restarted) must not requeue another worker's attempt.
            states = _end_attempts(conn, _HELD, (job_id, worker), error, max_attempts)
        return states[0] if states else None

    def requeue_interrupted(self) -> int:
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL,"
                " error = 'interrupted: the node stopped while this job ran'"
                " WHERE state = 'running'"
            )
        return cursor.rowcount

    def requeue_worker(self, worker: str, error: str, *, max_attempts: int) -> int:
        with self.db.transaction() as conn:
            where = "state = 'running' AND worker = ?"
            return len(_end_attempts(conn, where, (worker,), error, max_attempts))

    def counts(self) -> dict[JobState, int]:
        with self.db.reading() as conn:
            rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        counts = {state: 0 for state in JobState}
        counts.update({JobState(r["state"]): r["n"] for r in rows})
        return counts

    def get(self, job_id: int) -> Job | None:
        with self.db.reading() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row is not None else None


__all__ = [
    "Job",
    "JobKind",
    "JobState",
    "JobStore",
    "SqliteJobStore",
    "enqueue",
    "holds",
    "mark_succeeded",
]
