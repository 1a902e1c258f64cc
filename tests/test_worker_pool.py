"""Several worker processes, per-algorithm concurrency and run time limits, on real nodes.

Times are the jobs' own records (``started_at``: the claim; ``finished_at``: success or the
attempt's end), so the tests assert order and overlap, never how long anything took.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.scu import send
from tests.support.http import request
from tests.support.node import NodeProcess, plugin_env, wait_until

pytestmark = pytest.mark.integration

ALGORITHM = "example-threshold"
RULE = {"algorithm": ALGORITHM, "series": {"modality": ["CT"], "min_slices": 20}}
FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
HANG = "HANG HERE"  # the Series Description the example plugin hangs on


def pool_node(make_node, settings: dict, **worker) -> NodeProcess:
    """A node routing CT to the example plugin, with these plugin and worker settings, once
    all its worker processes have started and beaten (a job must not wait for a worker's
    start, or two jobs would run one after the other for that reason alone)."""
    node = make_node(
        assembly=FAST,
        routing={"rules": [RULE]},
        algorithms={ALGORITHM: settings},
        worker=worker,
        env=plugin_env(),
    )
    processes = worker.get("processes", 1)
    wait_until(
        lambda: len(node.query("SELECT name FROM workers WHERE stopped_at IS NULL")) >= processes,
        what=f"{processes} workers",
        log=node.log(),
    )
    return node


def send_series(node: NodeProcess, folder: Path, seed: int, description: str = "") -> None:
    files = write_ct_series(folder, CtPhantomSpec(slices=20, rows=32, columns=32, seed=seed))
    if description:
        for path in files:
            ds = dcmread(path)
            ds.SeriesDescription = description
            ds.save_as(path)
    assert len(send(files, "127.0.0.1", node.port).sent) == len(files)


def jobs(node: NodeProcess) -> list:
    return node.query(
        "SELECT id, state, attempts, worker, error, started_at, finished_at FROM jobs"
        " WHERE kind = 'inference' ORDER BY started_at"
    )


def all_in(node: NodeProcess, states: set[str], count: int) -> list:
    """Wait until ``count`` inference jobs are all in one of ``states``; them."""

    def done() -> list:
        rows = jobs(node)
        return rows if len(rows) == count and {r["state"] for r in rows} <= states else []

    return wait_until(done, timeout_s=120, what=f"{count} jobs {states}", log=node.log())  # type: ignore[return-value]


def test_a_hung_job_is_killed_at_its_time_limit_and_the_next_job_runs_on_a_new_worker(
    make_node, tmp_path: Path
) -> None:
    node = pool_node(
        make_node, {"hang": HANG}, time_limits={ALGORITHM: 3}, max_attempts=1, processes=1
    )
    send_series(node, tmp_path / "hung", seed=1, description=HANG)
    (hung,) = wait_until(
        lambda: [r for r in jobs(node) if r["state"] == "running"],
        what="the hung job running",
        log=node.log(),
    )
    # Queued behind the hung job: with one worker, only the kill lets it run.
    send_series(node, tmp_path / "next", seed=2)
    first, second = all_in(node, {"succeeded", "failed"}, 2)
    assert first["id"] == hung["id"] and first["state"] == "failed"
    assert "exceeded its time limit of 3 s" in first["error"], first["error"]
    assert first["attempts"] == 1  # max_attempts 1: failed, as a crash on its last try is
    assert second["state"] == "succeeded"
    assert second["worker"] != hung["worker"]  # a fresh worker process took it
    assert second["started_at"] >= first["finished_at"]
    log = node.log()
    assert f"inference worker {hung['worker']} was killed: its job exceeded" in log
    # The heartbeat said which job the worker was on while it hung; the killed worker is
    # recorded as stopped, so that the API and the metrics no longer list it.
    (killed,) = node.query(
        "SELECT job_id, job_phase, stopped_at FROM workers WHERE name = ?", (hung["worker"],)
    )
    assert (killed["job_id"], killed["job_phase"]) == (hung["id"], "running")
    assert killed["stopped_at"] is not None
    assert node.stop() == 0


def test_a_hung_job_is_retried_like_a_crash(make_node, tmp_path: Path) -> None:
    node = pool_node(make_node, {"hang": True}, time_limits={ALGORITHM: 2}, max_attempts=2)
    send_series(node, tmp_path / "hung", seed=3)
    (job,) = all_in(node, {"failed"}, 1)
    assert job["attempts"] == 2
    assert "exceeded its time limit of 2 s" in job["error"]
    # The supervisor logs each kill after recording it, so the job can read failed first.
    kills = "was killed: its job exceeded its time limit"
    wait_until(lambda: node.log().count(kills) >= 2, 30, "both kills logged", node.log())
    assert node.log().count(kills) == 2


def test_cancelling_a_hung_job_kills_its_worker_and_the_next_job_runs_on_a_new_one(
    make_node, tmp_path: Path
) -> None:
    """A run that never ends (and whose time limit is the default hour) stops when its job is
    cancelled: the supervisor kills the worker, the job stays cancelled with its one attempt,
    nothing of it is recorded, and a fresh worker takes the job queued behind it."""
    node = pool_node(make_node, {"hang": HANG}, max_attempts=3, processes=1)
    send_series(node, tmp_path / "hung", seed=6, description=HANG)
    (hung,) = wait_until(
        lambda: [r for r in jobs(node) if r["state"] == "running"],
        what="the hung job running",
        log=node.log(),
    )
    send_series(node, tmp_path / "next", seed=7)
    status, _ = request(node.http_url + f"/api/jobs/{hung['id']}/cancel", method="POST")
    assert status == 200
    # Bounded: without the kill, the hung run holds the only worker and the next job waits.
    first, second = all_in(node, {"succeeded", "cancelled"}, 2)
    assert (first["id"], first["state"], first["attempts"]) == (hung["id"], "cancelled", 1)
    assert first["error"].startswith("cancelled by http-api"), first["error"]
    assert second["state"] == "succeeded"
    assert second["worker"] != hung["worker"]  # a fresh worker process took it
    assert f"inference worker {hung['worker']} killed: its job {hung['id']} was cancelled" in (
        node.log()
    )
    assert [r["job_id"] for r in node.query("SELECT job_id FROM results")] == [second["id"]]
    assert not node.query("SELECT 1 FROM outputs WHERE job_id = ?", (hung["id"],))
    (killed,) = node.query("SELECT stopped_at FROM workers WHERE name = ?", (hung["worker"],))
    assert killed["stopped_at"] is not None
    assert node.stop() == 0


def test_two_workers_run_two_slow_jobs_side_by_side(make_node, tmp_path: Path) -> None:
    node = pool_node(make_node, {"delay_s": 4}, processes=2)
    send_series(node, tmp_path / "a", seed=4)
    send_series(node, tmp_path / "b", seed=5)
    a, b = all_in(node, {"succeeded"}, 2)
    assert a["worker"] != b["worker"]
    # b started before a finished: they overlapped.
    assert b["started_at"] < a["finished_at"], (dict(a), dict(b))
    assert node.stop() == 0


def test_a_concurrency_limit_keeps_jobs_of_an_algorithm_apart(make_node, tmp_path: Path) -> None:
    """The same two slow jobs and two workers as above, with the algorithm limited to one job
    at a time: the second waits for the first, though a worker is idle."""
    node = pool_node(make_node, {"delay_s": 4}, processes=2, concurrency={ALGORITHM: 1})
    send_series(node, tmp_path / "a", seed=4)
    send_series(node, tmp_path / "b", seed=5)
    a, b = all_in(node, {"succeeded"}, 2)
    assert b["started_at"] >= a["finished_at"], (dict(a), dict(b))
    assert node.stop() == 0
