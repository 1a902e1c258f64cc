"""What a worker may claim: only jobs of the algorithms it can run, and no more jobs of an
algorithm at once than its concurrency limit; how many worker processes a node runs, where,
and for how long a job may run. Against a real SQLite job store."""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from dicom_node.algorithm import Algorithm
from dicom_node.config import NodeConfig
from dicom_node.database import SqliteDatabase, database_path
from dicom_node.infer import Worker, WorkerSupervisor, time_limits, worker_environments
from dicom_node.jobs import (
    CompletionPayload,
    JobKind,
    JobState,
    SqliteJobStore,
)
from dicom_node.plugins import discover
from tests.support.jobs import queue

pytestmark = pytest.mark.unit


def algorithm_of(store: SqliteJobStore, worker: str, **claim: object) -> str | None:
    job = store.claim(worker, (JobKind.INFERENCE,), **claim)  # type: ignore[arg-type]
    return None if job is None else job.inference.algorithm


def test_a_claim_takes_only_jobs_of_the_algorithms_named(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    store = SqliteJobStore(db)
    queue(db, "a", "b", "c", "b")
    with db.transaction() as conn:  # a completion job passes any algorithm filter
        completion = CompletionPayload("series", "9.9", 1, "association released", 0.0)
        store.enqueue(conn, JobKind.SERIES_COMPLETE, "9.9", 1, completion)
    assert algorithm_of(store, "w1", algorithms=[]) is None
    assert algorithm_of(store, "w1", algorithms=["b", "x"]) == "b"
    assert algorithm_of(store, "w1", algorithms=["b", "x"]) == "b"
    assert algorithm_of(store, "w1", algorithms=["b", "x"]) is None
    assert algorithm_of(store, "w2", algorithms=["c"]) == "c"
    # Left queued for a worker that can run it, not failed.
    assert [j.inference.algorithm for j in store.recent(JobKind.INFERENCE)] == ["b", "c", "b", "a"]
    assert store.recent(JobKind.INFERENCE)[-1].state is JobState.QUEUED
    assert algorithm_of(store, "w3") == "a"  # no filter: anything
    routed = store.claim("router", (JobKind.SERIES_COMPLETE,), algorithms=["b"])
    assert routed is not None and routed.kind == JobKind.SERIES_COMPLETE.value
    db.close()


def test_a_claim_keeps_each_algorithm_under_its_concurrency_limit(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    store = SqliteJobStore(db)
    big_1, big_2, small, big_3 = queue(db, "big", "big", "small", "big")
    limits = {"big": 1, "other": 5}
    assert algorithm_of(store, "w1", concurrency=limits) == "big"
    # The second big job waits while the first runs; the next job that may run is taken.
    assert algorithm_of(store, "w2", concurrency=limits) == "small"
    assert algorithm_of(store, "w3", concurrency=limits) is None
    store.succeed(big_1)
    assert algorithm_of(store, "w3", concurrency=limits) == "big"
    assert store.get(big_2).state is JobState.RUNNING and store.get(big_2).worker == "w3"
    # A failed attempt frees its place as a success does.
    store.fail(big_2, "boom", worker="w3", max_attempts=1)
    assert algorithm_of(store, "w1", concurrency={"big": 2}) == "big"
    assert store.get(big_3).state is JobState.RUNNING and store.get(small).worker == "w2"
    db.close()


def test_concurrent_claims_from_several_connections_never_exceed_the_limit(
    tmp_path: Path,
) -> None:
    """Two workers (two connections, as two processes have) claiming as fast as they can: the
    count of running jobs is taken in the claim's own transaction, so the runs of the limited
    algorithm, as the jobs recorded them, never overlap."""
    path = tmp_path / "index.sqlite3"
    SqliteDatabase(path).close()
    ids = queue(SqliteDatabase(path), *(["big"] * 12))
    errors: list[BaseException] = []

    def work(name: str) -> None:
        db = SqliteDatabase(path)
        store = SqliteJobStore(db)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = store.claim(name, (JobKind.INFERENCE,), concurrency={"big": 1})
                if job is None:
                    if all(store.get(i).state is JobState.SUCCEEDED for i in ids):
                        return
                    time.sleep(0.001)  # a worker's poll, short: claims race
                    continue
                time.sleep(0.01)  # the run
                store.succeed(job.id)
                time.sleep(0.005)  # writing up: the others' claims come first
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    db = SqliteDatabase(path)
    jobs = sorted((SqliteJobStore(db).get(i) for i in ids), key=lambda j: j.started_at)
    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    assert len({j.worker for j in jobs}) > 1  # more than one worker took part
    for before, after in pairwise(jobs):
        assert before.finished_at <= after.started_at, (before, after)
    db.close()


def test_a_worker_claims_only_the_algorithms_it_can_run(tmp_path: Path, example_plugins) -> None:
    config = NodeConfig.model_validate(
        {"store": {"data_dir": str(tmp_path)}, "worker": {"device": "cpu", "max_attempts": 1}}
    )
    worker = Worker(config, name="w")
    assert "example-threshold" in worker.runnable
    assert "example-broken" not in worker.runnable  # installed, but its module is missing
    db = SqliteDatabase(database_path(tmp_path))
    broken, missing, runnable = queue(db, "example-broken", "not-installed", "example-threshold")
    job = worker.work_once()
    assert job is not None and job.id == runnable  # and it fails: the series has no instances
    assert worker.work_once() is None
    store = SqliteJobStore(db)
    assert store.get(runnable).state is JobState.FAILED
    assert [store.get(i).state for i in (broken, missing)] == [JobState.QUEUED] * 2
    worker.db.close()
    db.close()


def test_time_limits_come_from_the_algorithm_unless_configured(example_plugins) -> None:
    registry = discover()
    config = NodeConfig.model_validate({"worker": {"time_limits": {"lung-nodules-ct": 900}}})
    limits = time_limits(config, registry)
    assert limits["lung-nodules-ct"] == 900
    assert limits["example-threshold"] == Algorithm.time_limit_s == 3600
    assert "example-broken" not in limits
    with pytest.raises(ValueError, match="greater than 0"):
        NodeConfig.model_validate({"worker": {"time_limits": {"lung-nodules-ct": 0}}})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        NodeConfig.model_validate({"worker": {"concurrency": {"brain-tumour-mr": 0}}})


def test_worker_processes_and_their_gpus(monkeypatch) -> None:
    def environments(**worker: object) -> list[dict[str, str]]:
        return worker_environments(NodeConfig.model_validate({"worker": worker}))

    assert environments(device="cpu") == [{}]
    assert environments(device="cpu", processes=3) == [{}, {}, {}]
    # One named GPU: every process on it, processes_per_gpu of them by default.
    assert environments(device="cuda:1", processes_per_gpu=2) == [{}, {}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert environments(device="cuda") == [
        {"CUDA_VISIBLE_DEVICES": "2"},
        {"CUDA_VISIBLE_DEVICES": "5"},
    ]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in environments(processes_per_gpu=2)] == [
        "2",
        "5",
        "2",
        "5",
    ]
    assert environments(device="auto", processes=1) == [{"CUDA_VISIBLE_DEVICES": "2"}]
    assert environments(device="cpu") == [{}]  # CPU asked for: no GPU given


def test_a_limit_for_an_algorithm_not_installed_is_reported(tmp_path: Path, caplog) -> None:
    config = NodeConfig.model_validate(
        {
            "store": {"data_dir": str(tmp_path)},
            "worker": {"time_limits": {"lung-nodles-ct": 60}, "concurrency": {"pneumonia-cxr": 1}},
        }
    )
    db = SqliteDatabase(database_path(tmp_path))
    supervisor = WorkerSupervisor(config, SqliteJobStore(db))
    assert "worker.time_limits names no installed algorithm: lung-nodles-ct" in caplog.text
    assert "worker.concurrency" not in caplog.text  # pneumonia-cxr is installed
    assert supervisor.limit("lung-nodules-ct") == Algorithm.time_limit_s
    db.close()
