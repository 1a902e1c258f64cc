"""Background loops survive a database that fails under them (issue 16, item 5).

The failure injected is a real one: another connection holds ``BEGIN EXCLUSIVE`` on the
node's SQLite file, so each loop's write fails with "database is locked" (the node's own
connection is given a short busy timeout, so the test need not wait the node's 10 s). Each
loop must go on, say so where readiness and the metrics read it while it backs off, log the
reason once, and recover when the lock goes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dicom_node.assembly import Assembler
from dicom_node.config import AssemblyConfig, NodeConfig, RetentionConfig, RoutingConfig
from dicom_node.database import Database, SqliteDatabase, database_path
from dicom_node.deliver import Deliverer
from dicom_node.jobs import (
    CompletionPayload,
    DeliveryState,
    InferencePayload,
    JobKind,
    job_store,
)
from dicom_node.loops import Loop, LoopCollector, loops_check
from dicom_node.retention import purge_expired
from dicom_node.route import Router
from tests.support.jobs import add_open_series

pytestmark = pytest.mark.unit

FAST_BACKOFF = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}


def _database(tmp_path: Path) -> Database:
    db = SqliteDatabase(database_path(tmp_path))
    with db.reading() as conn:  # wait 50 ms for a lock rather than the node's 10 s
        conn.execute("PRAGMA busy_timeout=50")
    return db


@contextmanager
def _locked(tmp_path: Path) -> Iterator[None]:
    """Another connection holds the database's write lock until the block ends."""
    holder = sqlite3.connect(database_path(tmp_path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _wait(condition: Callable[[], object], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _survives(loop: Loop, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under a held lock the loop backs off (and says so) without dying; it logs the reason
    once however often it fails; it recovers when the lock goes."""
    loop.backoff_initial_s, loop.backoff_max_s = FAST_BACKOFF.values()
    check = loops_check([loop])
    registry = CollectorRegistry()
    registry.register(LoopCollector([loop]))
    caplog.set_level(logging.WARNING, logger="dicom_node.loops")
    with _locked(tmp_path):
        loop.start()
        try:
            _wait(lambda: loop.state.failures >= 3)
            state = loop.state
            assert state.running
            assert state.backing_off is not None and "database is locked" in state.backing_off
            problem = check()
            assert problem is not None
            assert f"{loop.name} backing off" in problem and "database is locked" in problem
            metrics = generate_latest(registry).decode()
            assert f'dicom_node_loop_backing_off{{loop="{loop.name}"}} 1.0' in metrics
            assert f'dicom_node_loop_failures_total{{loop="{loop.name}"}}' in metrics
        except BaseException:
            loop.stop()
            raise
    try:
        _wait(lambda: loop.state.backing_off is None and loop.state.last_success is not None)
        assert check() is None
        assert loop.state.running
        metrics = generate_latest(registry).decode()
        assert f'dicom_node_loop_backing_off{{loop="{loop.name}"}} 0.0' in metrics
        assert f'dicom_node_loop_last_success_timestamp{{loop="{loop.name}"}}' in metrics
    finally:
        loop.stop()
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and r.name == "dicom_node.loops"
    ]
    assert len(errors) == 1 and "database is locked" in errors[0].getMessage()
    assert errors[0].exc_info is None  # the reason, not a traceback per try
    assert any("recovered" in r.getMessage() for r in caplog.records)


def test_the_router_survives_a_locked_database(tmp_path, caplog) -> None:
    """Router.route_next claims outside its own try: a locked database ended the thread."""
    db = _database(tmp_path)
    router = Router(tmp_path, db, RoutingConfig(), installed=frozenset)
    _survives(router.loop, tmp_path, caplog)
    db.close()


def test_the_quiet_timer_survives_a_locked_database(tmp_path, caplog) -> None:
    db = _database(tmp_path)
    add_open_series(db, 1000)  # quiet for long: the timer must write
    config = AssemblyConfig(series_quiet_seconds=0.05, study_quiet_seconds=0.05)
    assembler = Assembler(db, config)
    _survives(assembler.loop, tmp_path, caplog)
    assert {j.kind for j in job_store(db).recent(JobKind.SERIES_COMPLETE)} == {
        JobKind.SERIES_COMPLETE.value
    }
    db.close()


def test_the_deliverer_survives_a_locked_database(tmp_path, caplog) -> None:
    db = _database(tmp_path)
    jobs = job_store(db)
    payload = InferencePayload("example", {"series": "1.2.3"}, "series", ("nowhere",))
    with db.transaction() as conn:  # a due delivery, whose failure the deliverer must record
        job_id = jobs.enqueue(conn, JobKind.INFERENCE, "1.2.3", 1, payload)
        jobs.schedule_deliveries(conn, job_id, payload)
    config = NodeConfig.model_validate({"store": {"data_dir": str(tmp_path)}})
    deliverer = Deliverer(config, db, tmp_path)
    _survives(deliverer.loop, tmp_path, caplog)
    # Recovered, it did its work: the destination is not configured, a dead letter at once.
    assert [d.state for d in jobs.deliveries()] == [DeliveryState.DEAD]
    db.close()


def test_retention_survives_a_locked_database_in_a_loop_of_its_own(tmp_path, caplog) -> None:
    db = _database(tmp_path)
    with db.transaction() as conn:  # a study routed nowhere, completed long ago: purged
        conn.execute(
            "INSERT INTO studies (study_uid, study_key, first_received, last_received,"
            " completed_at) VALUES ('1.2', 'k1', 1000, 1000, 1000)"
        )
    retention = RetentionConfig(instances_hours=0)
    loop = Loop(
        "retention", lambda: purge_expired(db, tmp_path, retention, time.time()) and None, 60
    )
    _survives(loop, tmp_path, caplog)
    with db.reading() as conn:
        assert conn.execute("SELECT subject FROM purges").fetchall()[0][0] == "study:1.2"
    db.close()


def test_a_step_that_finds_more_is_called_again_at_once_and_a_wake_cuts_the_wait() -> None:
    calls: list[float] = []

    def step() -> bool:
        calls.append(time.monotonic())
        return len(calls) < 3  # three at once, then wait for the (long) interval

    loop = Loop("probe", step, 3600)
    loop.start()
    try:
        _wait(lambda: len(calls) == 3)
        loop.wake()
        _wait(lambda: len(calls) == 4)
    finally:
        loop.stop()
    assert not loop.state.running and loop.state.failures == 0


def test_the_backoff_doubles_up_to_its_cap() -> None:
    def step() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    loop = Loop("probe", step, 0.5, backoff_initial_s=1, backoff_max_s=5)
    assert [loop.run_once() for _ in range(5)] == [1, 2, 4, 5, 5]
    assert loop.state.backing_off == "OperationalError: disk I/O error"


def test_a_library_message_is_not_logged_above_debug(caplog) -> None:
    """A library's message may quote the data it choked on: the reason is its type and where."""

    def step() -> None:
        raise ValueError("Unable to convert '19230417' to 'DA' object")

    caplog.set_level(logging.DEBUG, logger="dicom_node.loops")
    loop = Loop("probe", step, 0.5)
    loop.run_once()
    assert loop.state.backing_off is not None and "1923" not in loop.state.backing_off
    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert above_debug and not any("1923" in m for m in above_debug)


def test_completion_jobs_routed_after_the_router_recovers(tmp_path, caplog) -> None:
    """What the router could not claim while the lock was held, it routes afterwards."""
    db = _database(tmp_path)
    jobs = job_store(db)
    with db.transaction() as conn:
        jobs.enqueue(
            conn,
            JobKind.SERIES_COMPLETE,
            "1.2.3",
            1,
            CompletionPayload("series", "1.2.3", 0, "quiet", 0.0),
        )
    router = Router(tmp_path, db, RoutingConfig(), installed=frozenset)
    _survives(router.loop, tmp_path, caplog)
    (job,) = jobs.recent(JobKind.SERIES_COMPLETE)
    assert job.attempts == 1 and job.finished_at is not None
    db.close()
