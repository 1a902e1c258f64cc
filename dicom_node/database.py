"""The embedded SQLite database shared by the instance index and the job store.

One file, WAL mode, ``synchronous=FULL``: a transaction that returned is on disk, which is the
promise behind every Success status the SCP sends. Readers (``dicom-node status``, workers) open
their own connections and never block the writer.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid       TEXT PRIMARY KEY,
    study_key       TEXT NOT NULL,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    completed_at    REAL,            -- NULL while open (never completed, or reopened)
    completions     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS series (
    series_uid      TEXT PRIMARY KEY,
    series_key      TEXT NOT NULL,
    study_uid       TEXT NOT NULL REFERENCES studies(study_uid),
    modality        TEXT,
    series_number   INTEGER,
    description     TEXT,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    completed_at    REAL,
    completions     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL REFERENCES series(series_uid),
    study_uid        TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,   -- relative to the data folder
    size             INTEGER NOT NULL,
    calling_aet      TEXT NOT NULL,
    peer_host        TEXT NOT NULL,
    received_at      REAL NOT NULL,
    request_priority TEXT             -- the C-STORE request's Priority: HIGH, MEDIUM, LOW
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid);
-- The API lists studies with their instances and senders, and maps jobs to their study.
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_uid);
-- The quiet timer looks for open series/studies twice a second: only the open ones are indexed.
CREATE INDEX IF NOT EXISTS open_series ON series(last_received) WHERE completed_at IS NULL;
CREATE INDEX IF NOT EXISTS open_studies ON studies(last_received) WHERE completed_at IS NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,
    subject_uid  TEXT NOT NULL,
    generation   INTEGER NOT NULL,   -- which completion of the subject this job is for
    payload      TEXT NOT NULL,      -- JSON
    state        TEXT NOT NULL
                 CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    worker       TEXT,
    error        TEXT,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    priority     TEXT NOT NULL DEFAULT 'routine'   -- stat, urgent, routine: the claim's order
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS results (
    job_id      INTEGER PRIMARY KEY REFERENCES jobs(id),
    algorithm   TEXT NOT NULL,
    path        TEXT NOT NULL,       -- result.json, relative to the data folder
    created_at  REAL NOT NULL,
    device      TEXT,                -- where the algorithm ran (cpu, cuda:0)
    run_s       REAL                 -- the algorithm's own run, reading its inputs included
);
CREATE TABLE IF NOT EXISTS workers (
    name          TEXT PRIMARY KEY,
    pid           INTEGER NOT NULL,
    host          TEXT NOT NULL,
    device        TEXT NOT NULL,
    started_at    REAL NOT NULL,
    heartbeat_at  REAL NOT NULL,
    stopped_at    REAL,
    algorithms    TEXT NOT NULL,     -- JSON: what the worker can run, its weights, DEMO or not
    gpu_memory    TEXT,              -- JSON {allocated, reserved, total} bytes, on CUDA
    job_id        INTEGER,           -- the job it is on (NULL: waiting for one)
    job_phase     TEXT,              -- loading, running, writing: what it does with the job
    progress_at   REAL               -- when it last moved from one phase to the next
);
CREATE TABLE IF NOT EXISTS outputs (
    sop_instance_uid TEXT PRIMARY KEY,  -- what a re-delivery sends again, unchanged
    job_id           INTEGER NOT NULL REFERENCES jobs(id),
    kind             TEXT NOT NULL,     -- SEG, SR, SC
    sop_class_uid    TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    path             TEXT NOT NULL      -- relative to the data folder
);
CREATE INDEX IF NOT EXISTS outputs_by_job ON outputs(job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          INTEGER NOT NULL REFERENCES jobs(id),
    destination     TEXT NOT NULL,          -- a name under 'destinations', or 'sender'
    peer_aet        TEXT NOT NULL DEFAULT '', -- for 'sender': the calling AE it goes back to
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    sent_at         REAL,
    UNIQUE (job_id, destination, peer_aet)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries(job_id);
CREATE TABLE IF NOT EXISTS purges (
    subject     TEXT PRIMARY KEY,  -- 'study:<uid>' (received instances) or 'job:<id>' (results)
    purged_at   REAL NOT NULL,
    files       INTEGER NOT NULL,
    bytes       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS routing_decisions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    level        TEXT NOT NULL CHECK (level IN ('series', 'study')),
    subject_uid  TEXT NOT NULL,
    generation   INTEGER NOT NULL,   -- the completion it decides
    decided_at   REAL NOT NULL,
    summary      TEXT NOT NULL,      -- one line for a person
    routed       TEXT NOT NULL,      -- JSON [{algorithm, inputs}]
    not_routed   TEXT NOT NULL,      -- JSON [{algorithm, reason}]
    UNIQUE (level, subject_uid, generation)
);
"""


# Columns added after a schema's first release: (table, column, declaration). A database made
# by an older version gets them at open; CREATE TABLE IF NOT EXISTS would not add them.
_ADDED_COLUMNS = (
    ("results", "device", "TEXT"),
    ("results", "run_s", "REAL"),
    # Schema 3 (issue 16): the queue's priority classes and the request Priority rules match.
    ("jobs", "priority", "TEXT NOT NULL DEFAULT 'routine'"),
    ("instances", "request_priority", "TEXT"),
    # The job a worker is on and how far it got: its supervisor measures the time limit.
    ("workers", "job_id", "INTEGER"),
    ("workers", "job_phase", "TEXT"),
    ("workers", "progress_at", "REAL"),
)

RESULTS_DIR = "results"  # under the data folder: one folder per job, named by its ID


def database_path(data_dir: Path) -> Path:
    return data_dir / "index.sqlite3"


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the database; a writable open creates the schema if needed."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        _add_columns(conn)
        _allow_cancelled_jobs(conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _add_columns(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise


def _allow_cancelled_jobs(conn: sqlite3.Connection) -> None:
    """Schema 4 (issue 16): a job may be ``cancelled``. SQLite cannot change a CHECK
    constraint in place, so a jobs table made before is rebuilt as its documentation says
    (https://www.sqlite.org/lang_altertable.html#otheralter), once, by whichever process
    opens the database first."""

    def current() -> str:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
        return str(row.fetchone()[0])

    if "'cancelled'" in current():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if "'cancelled'" not in current():  # another process may have rebuilt it meanwhile
            table = re.search(r"CREATE TABLE IF NOT EXISTS jobs \(.*?\n\);", _SCHEMA, re.S)
            assert table is not None
            columns = ", ".join(r[1] for r in conn.execute("PRAGMA table_info(jobs)"))
            indexes = [
                r[0]
                for r in conn.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
                    " AND sql IS NOT NULL"
                )
            ]
            conn.execute(table[0].replace("IF NOT EXISTS jobs", "jobs_rebuilt"))
            conn.execute(f"INSERT INTO jobs_rebuilt ({columns}) SELECT {columns} FROM jobs")
            conn.execute("DROP TABLE jobs")
            conn.execute("ALTER TABLE jobs_rebuilt RENAME TO jobs")
            for index in indexes:
                conn.execute(index)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    """A writable connection shared by the threads of one process, one transaction at a time."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._lock = threading.RLock()

    @classmethod
    def over(cls, conn: sqlite3.Connection) -> Database:
        """A Database on a connection the caller opened (a read-only one, say) and closes, so
        that the stores built on a Database can read through it."""
        db = cls.__new__(cls)
        db._conn = conn
        db._lock = threading.RLock()
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block as one IMMEDIATE transaction: all of it is committed, or none."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()
