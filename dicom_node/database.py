"""The database shared by the instance index and the job store.

Embedded mode: one SQLite file, WAL mode, ``synchronous=FULL``: a transaction that returned is
on disk, which is the promise behind every Success status the SCP sends. Readers (``dicom-node
status``, workers) open their own connections and never block the writer.

Cluster mode (``cluster.database_url``): PostgreSQL (:mod:`dicom_node.database_postgres`), with
the same schema text and the same queries. Code outside this module sees only the
:class:`Database`, :class:`Connection`, :class:`Cursor` and :class:`Row` protocols, and writes
SQL both engines run (docs/architecture.md, "Seams").
"""

from __future__ import annotations

import re
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

SCHEMA_VERSION = 5

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
    priority     TEXT NOT NULL DEFAULT 'routine',  -- stat, urgent, routine: the claim's order
    attempt_token TEXT,              -- the running attempt's token: only it may commit
    lease_until  REAL,               -- cluster: the claim holds until then (database clock)
    staged_at    REAL,               -- cluster: inputs are in the object store
    dispatched_at REAL               -- cluster: when the broker was last rung for it
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
    # Schema 5 (issue 17): attempts fenced by a token, leases, staging and dispatch (cluster).
    ("jobs", "attempt_token", "TEXT"),
    ("jobs", "lease_until", "REAL"),
    ("jobs", "staged_at", "REAL"),
    ("jobs", "dispatched_at", "REAL"),
)

RESULTS_DIR = "results"  # under the data folder: one folder per job, named by its ID


class Row(Protocol):
    """A result row: by position or by column name, like :class:`sqlite3.Row`."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    """What a statement returns. ``fetchone``/``fetchall`` give :class:`Row` objects (typed
    ``Any`` as :mod:`sqlite3` does, so that ``row[0]`` needs no cast at every call site)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection as the node's code uses it: ``?`` placeholders, rows by name."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Cursor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Dialect:
    """The few things the portable SQL must still spell per engine."""

    name: Literal["sqlite", "postgresql"]
    now: str  # an SQL expression: the database's clock in epoch seconds
    lock_skip: str  # appended to a claim's row-locking subquery


SQLITE = Dialect("sqlite", "((julianday('now') - 2440587.5) * 86400.0)", "")
POSTGRESQL = Dialect(
    "postgresql", "EXTRACT(EPOCH FROM clock_timestamp())", " FOR UPDATE SKIP LOCKED"
)


class Database(Protocol):
    """The index and job store's database: one writer transaction at a time per process."""

    @property
    def dialect(self) -> Dialect: ...

    def transaction(self) -> AbstractContextManager[Connection]:
        """Run a block as one transaction: all of it is committed, or none."""
        ...

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads outside a transaction."""
        ...

    def reading_beside(self) -> AbstractContextManager[Connection]:
        """A connection for a read that need not wait for another thread's transaction: it
        sees the last commit. The store's hot path reads through it so that concurrent
        associations reach the group commit while another's commit is on its way to disk."""
        ...

    def close(self) -> None: ...


def database_path(data_dir: Path) -> Path:
    return data_dir / "index.sqlite3"


def database_errors() -> tuple[type[Exception], ...]:
    """The exceptions a database raises when it cannot do what was asked (locked, gone, full).
    psycopg's only when cluster code imported it: embedded mode never loads it."""
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errors += (psycopg.Error,)
    return errors


def open_database(config: NodeConfig) -> Database:
    """The node's writable database: PostgreSQL in cluster mode, else the SQLite file under
    the data folder (created with the schema when missing)."""
    if config.cluster.database_url is not None:
        from dicom_node.database_postgres import PostgresDatabase

        return PostgresDatabase(config.cluster.database_url)
    return SqliteDatabase(database_path(config.store.data_dir.resolve()))


def has_database(config: NodeConfig) -> bool:
    """False only for an embedded node that has received nothing yet (no SQLite file): readers
    then report empty instead of failing to open it."""
    if config.cluster.database_url is not None:
        return True
    return database_path(config.store.data_dir.resolve()).exists()


@contextmanager
def open_reader(config: NodeConfig) -> Iterator[Connection]:
    """A read-only connection of its own (status, metrics, the API), closed on leaving."""
    conn: Connection
    if config.cluster.database_url is not None:
        from dicom_node.database_postgres import connect_reader

        conn = connect_reader(config.cluster.database_url)
    else:
        conn = connect(database_path(config.store.data_dir.resolve()), readonly=True)
    try:
        yield conn
    finally:
        conn.close()


def schema_version(db: Database) -> int:
    """The schema version the database was last opened with (``cluster check`` compares it
    with :data:`SCHEMA_VERSION`)."""
    with db.reading() as conn:
        if db.dialect.name == "sqlite":
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)


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


class SqliteDatabase:
    """A writable connection shared by the threads of one process, one transaction at a time."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._lock = threading.RLock()
        self._path = path
        # One read-only connection per thread for reading_beside (WAL lets them read while
        # the writer commits); all of them, to close them.
        self._beside = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
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
    def reading(self) -> Iterator[Connection]:
        with self._lock:
            yield self._conn

    @contextmanager
    def reading_beside(self) -> Iterator[Connection]:
        conn = getattr(self._beside, "conn", None)
        if conn is None:
            conn = self._beside.conn = connect(self._path, readonly=True)
            with self._readers_lock:
                self._readers.append(conn)
        yield conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        with self._readers_lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()


class _OverConnection:
    """A Database on a connection the caller opened (a read-only one, say) and closes."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self.dialect = dialect
        self._conn = conn
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._lock:
            yield self._conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self._lock:
            yield self._conn

    def reading_beside(self) -> AbstractContextManager[Connection]:
        return self.reading()

    def close(self) -> None:
        """The caller closes the connection it opened."""


def over(conn: Connection) -> Database:
    """A Database on a connection the caller opened and closes (from :func:`open_reader`), so
    that the stores built on a Database can read through it."""
    dialect = SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRESQL
    return _OverConnection(conn, dialect)
