"""Crash loop: SIGKILL at random moments across the whole pipeline, restart, and in the end
every acknowledged study has exactly one result set at its destination.

Each iteration a modality (dcmtk storescu) sends a new small CT study, together with whatever
of earlier studies was never acknowledged (a C-STORE without a Success response is sent again,
as a modality does), and the node is killed with SIGKILL at a moment drawn from a seeded RNG:

- ingest: a random delay after the send started, usually mid-association;
- completion: a random delay after the association was released (completion, routing);
- inference: while an inference job is ``running`` (the example plugin's run, its writing of
  SEG and SR, the transaction that records them);
- delivery: while a delivery is ``pending`` (the copy into the destination folder, the record
  that it was sent).

Half of the kills take only the node (its worker is told by the kernel that its parent died),
half take the worker with it, as a power cut or a container kill does. The node is started
again, mostly at once, sometimes after staying down about the quiet time (a reboot), and the
next iteration begins. After the last one nothing is killed any more: the modality sends what
is still unacknowledged and the node drains its queues. Then every acknowledged instance is
stored as sent, and for every study: one inference job, one delivery, sent, and at the folder
destination exactly the two objects (SEG and SR, distinct SOP Instance UIDs) that job recorded,
byte for byte, the SEG made from every slice of the series; nothing else at the destination,
no partial file left; no worker of a killed node still alive.

The modality comes back within a moment of the node (less than ``series_quiet_seconds``): a
series whose sender stays away longer than that is complete by the node's rules, and more
instances later are a new completion, as docs/guarantees.md "Completion" says. The node's own
downtime does not count against the sender.

The three tests after the loop reproduce, deterministically, the faults it is there to find.

CI runs 20 iterations with one worker process and 10 with two (``worker.processes``: two
jobs in flight at a kill), about three minutes on two cores, and 10 in cluster mode (issue 17:
the node on PostgreSQL, RabbitMQ and SeaweedFS, its jobs run by one worker host, which half
the kills take down with the node). The slow mode runs more:

    DICOM_NODE_CRASH_ITERATIONS=200 pytest tests/test_crash_loop.py

``DICOM_NODE_CRASH_SEED=<n>`` replays a run; the seed is printed either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydicom import dcmread

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.scu import send
from tests.support.cluster import (
    cluster_settings,
    kill_cluster_worker,
    start_cluster_worker,
    stop_cluster_worker,
)
from tests.support.modality import (
    Modality,
    Study,
    check_every_study_once,
    check_one_result_set,
    settled,
    unsettled,
)
from tests.support.node import NodeProcess, plugin_env
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.rabbitmq import rabbitmq  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

ITERATIONS = int(os.environ.get("DICOM_NODE_CRASH_ITERATIONS", "20"))
# Cluster mode: 10 in CI; the slow mode's DICOM_NODE_CRASH_ITERATIONS=200 runs 200 here too.
CLUSTER_ITERATIONS = int(os.environ.get("DICOM_NODE_CRASH_ITERATIONS", "10"))
LONG_RUN_S = 2.5  # a run the restarted node comes back in the middle of
RUN_S = 0.4  # each example-plugin run: long enough for a kill to land inside it
# The modality must reach a restarted node within this (see the module docstring). 2 s was
# too short on two loaded cores: an iteration's kill can land before its storescu has even
# associated, and a node then up 3.5 s without a resend rightly completed a partial series.
QUIET_S = 4.0
QUIET = {"series_quiet_seconds": QUIET_S, "study_quiet_seconds": QUIET_S}
DOWN_FOR_A_WHILE = 0.3  # the share of kills after which the node stays down about QUIET_S
RESEND_WITHIN_S = 0.8  # how long after the restart the modality comes back: within the quiet time
RETRIES = {"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "poll_s": 0.05, "max_attempts": 1000}
KILL_POINTS = {"ingest": 3, "completion": 2, "inference": 3, "delivery": 2}  # relative weights


def worker_pids(node: NodeProcess) -> list[int]:
    return [int(p) for p in re.findall(r"started inference worker \S+ \(pid (\d+)\)", node.log())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (reaped by nobody yet) is dead for our purposes.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def poll(node: NodeProcess, sql: str, timeout_s: float) -> bool:
    """Poll until the query returns a row; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.query(sql):
            return True
        time.sleep(0.005)
    return False


def crash_node(
    make_node,
    outbox: Path,
    *,
    run_s: float = RUN_S,
    quiet: dict = QUIET,
    processes: int = 1,
    cluster: dict[str, Any] | None = None,
) -> NodeProcess:
    """The node under test; with ``cluster`` settings, in cluster mode (its jobs run on a
    worker host of the test's, :class:`ClusterCrash`)."""
    # In cluster mode a host killed mid-job spends one of the job's attempts (its lease runs
    # out; a job that kills its host every time must fail in the end), and the loop may kill
    # the host in the middle of the same job on consecutive iterations (seen: 3 of 30): as
    # many tries as the deliveries get.
    on_hosts = {"device": "cpu", "max_attempts": RETRIES["max_attempts"]} if cluster else {}
    return make_node(
        worker={"processes": processes, **on_hosts},
        assembly=quiet,
        routing={
            "rules": [{"algorithm": "example-threshold", "series": {"modality": ["CT"]}}],
            "destinations": ["outbox"],
        },
        destinations={"outbox": {"type": "folder", "path": str(outbox)}},
        algorithms={"example-threshold": {"delay_s": run_s}},
        delivery=RETRIES,
        env=plugin_env(),
        **({"cluster": cluster} if cluster else {}),
    )


def kill(node: NodeProcess, *, with_worker: bool, processes: int = 1) -> None:
    if with_worker:
        for pid in worker_pids(node)[-processes:]:  # the node's current workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    node.kill()


class Crashable(Protocol):
    """What the loop kills and starts again: a node and whatever runs its jobs."""

    node: NodeProcess

    def kill(self, *, with_worker: bool) -> None: ...

    def start(self) -> None: ...


class EmbeddedCrash:
    """An embedded node and its supervised worker processes (killed with it, or told by the
    kernel that their parent died)."""

    def __init__(self, node: NodeProcess, processes: int) -> None:
        self.node = node
        self.processes = processes

    def kill(self, *, with_worker: bool) -> None:
        kill(self.node, with_worker=with_worker, processes=self.processes)

    def start(self) -> None:
        self.node.start()


class ClusterCrash:
    """A node in cluster mode and one worker host (``dicom-node worker --cluster``, a process
    group of its own): a kill takes the node, and with the worker the whole host (kill -9 of
    its group: its running job's lease runs out and the job is taken back)."""

    def __init__(self, node: NodeProcess, scratch: Path) -> None:
        self.node = node
        self.scratch = scratch
        self.host: subprocess.Popen[bytes] | None = None
        self.start_host()

    def start_host(self) -> None:
        self.host = start_cluster_worker(self.node.config_path, "host", self.scratch)

    def kill(self, *, with_worker: bool) -> None:
        if with_worker and self.host is not None:
            kill_cluster_worker(self.host)
            self.host = None
        self.node.kill()

    def start(self) -> None:
        # The host first: it needs only the servers, and the modality's resend must come
        # within a moment of the node (the host's start takes seconds).
        if self.host is None:
            self.start_host()
        self.node.start()

    def stop(self) -> None:
        assert self.node.stop() == 0
        if self.host is not None:
            host, self.host = self.host, None
            assert stop_cluster_worker(host) == 0


def crash_loop(target: Crashable, modality: Modality, rng: random.Random, iterations: int) -> None:
    """The loop: each iteration a new study is sent (with what was never acknowledged) and
    ``target`` killed at a point drawn by ``rng``, then started again; afterwards the
    modality sends what is outstanding and the node drains its queues. Every acknowledged
    study then has exactly one result set at the destination (the caller checks)."""
    node = target.node
    landed: Counter[str] = Counter()
    for _ in range(iterations):
        modality.new_study(rng)
        modality.start_sending(node)
        point = rng.choices(list(KILL_POINTS), weights=list(KILL_POINTS.values()))[0]
        if point == "ingest":
            time.sleep(rng.uniform(0.0, 0.3))
            hit = modality.proc.poll() is None
        else:
            modality.finish_sending()
            if point == "completion":
                time.sleep(rng.uniform(0.0, 0.3))
                hit = True
            elif point == "inference":
                running = "SELECT id FROM jobs WHERE kind = 'inference' AND state = 'running'"
                hit = poll(node, running, timeout_s=15)
                time.sleep(rng.uniform(0.0, RUN_S + 0.2))
            else:
                hit = poll(node, "SELECT id FROM deliveries WHERE state = 'pending'", 15)
                time.sleep(rng.uniform(0.0, 0.03))
        target.kill(with_worker=rng.random() < 0.5)
        modality.finish_sending()
        landed[point if hit else f"{point} (missed)"] += 1
        if rng.random() < DOWN_FOR_A_WHILE:
            time.sleep(rng.uniform(QUIET_S / 2, QUIET_S * 1.5))  # a reboot, not a quick restart
        target.start()
        if modality.outstanding:
            time.sleep(rng.uniform(0.0, RESEND_WITHIN_S))  # the modality's own retry interval
    print(f"kills: {dict(sorted(landed.items()))}")

    # The modality sends what is still unacknowledged, and the node drains its queues.
    for _ in range(3):
        if not modality.outstanding:
            break
        modality.start_sending(node)
        modality.finish_sending()
    assert not modality.outstanding, "the node refused instances after its restarts"
    deadline = time.monotonic() + 120
    while not settled(node, modality.studies) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert settled(node, modality.studies), f"{unsettled(node)}\n{node.log()[-5000:]}"


def crash_seed() -> int:
    """``DICOM_NODE_CRASH_SEED``, else a fresh one (printed: a run can be replayed)."""
    return int(os.environ.get("DICOM_NODE_CRASH_SEED", random.SystemRandom().randrange(2**32)))


# With two worker processes (worker.processes) each kill may take two workers in the middle
# of two jobs; half the iterations, to keep CI's time.
@pytest.mark.parametrize(
    ("processes", "iterations"), [(1, ITERATIONS), (2, max(1, ITERATIONS // 2))]
)
def test_sigkill_loop_delivers_every_acknowledged_study_exactly_once(
    make_node, tmp_path: Path, processes: int, iterations: int
) -> None:
    seed = crash_seed()
    print(f"\ncrash loop: {iterations} iterations, {processes} worker(s), seed {seed}")
    outbox = tmp_path / "outbox"
    node = crash_node(make_node, outbox, processes=processes)
    modality = Modality(tmp_path / "studies")
    crash_loop(EmbeddedCrash(node, processes), modality, random.Random(seed), iterations)

    # Every file sent was acknowledged and is stored as sent; one result set per study.
    check_every_study_once(node, outbox, modality.studies)
    print(f"{len(modality.studies)} studies, each delivered exactly once")

    # No worker of a killed node lives on beside the current one.
    earlier = worker_pids(node)[:-processes]
    assert node.stop() == 0
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in earlier) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in earlier if alive(pid)], "a worker outlived its node"


def test_sigkill_loop_in_cluster_mode_delivers_every_acknowledged_study_exactly_once(
    make_node, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same loop with the node in cluster mode (PostgreSQL, RabbitMQ, SeaweedFS: the
    session's servers, none of which is killed here) and one worker host: a kill takes the
    node, half the time the host with it. Jobs the killed node left running go on on the host
    (a restart does not take them back), a dead host's jobs come back when their lease runs
    out, and the same exactly-once checks hold."""
    seed = crash_seed()
    print(f"\ncrash loop (cluster): {CLUSTER_ITERATIONS} iterations, seed {seed}")
    cluster = cluster_settings(
        request.getfixturevalue("postgres_url"),
        request.getfixturevalue("rabbitmq").url,
        request.getfixturevalue("seaweedfs"),
        lease_s=3.0,  # a killed host's job comes back within seconds
    )
    outbox = tmp_path / "outbox"
    node = crash_node(make_node, outbox, cluster=cluster)
    target = ClusterCrash(node, tmp_path / "host")
    modality = Modality(tmp_path / "studies")
    try:
        crash_loop(target, modality, random.Random(seed), CLUSTER_ITERATIONS)
        check_every_study_once(node, outbox, modality.studies)
        print(f"{len(modality.studies)} studies, each delivered exactly once")
        target.stop()
    finally:
        if target.host is not None:
            kill_cluster_worker(target.host)


def test_a_killed_nodes_worker_does_not_finish_its_job_beside_the_new_one(
    make_node, tmp_path: Path
) -> None:
    """A node killed while its worker runs a long job: the kernel tells the worker (SIGTERM),
    the restarted node queues the job again and its new worker runs it. The old worker must
    not finish the job too: two attempts of one job recording their objects left four outputs
    for one job, two of them naming objects whose files the other attempt had overwritten."""
    outbox = tmp_path / "outbox"
    node = crash_node(
        make_node,
        outbox,
        run_s=LONG_RUN_S,
        quiet={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
    )
    ct = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=12, rows=64, columns=64))
    assert len(send(ct, "127.0.0.1", node.port).sent) == len(ct)
    assert poll(node, "SELECT id FROM jobs WHERE state = 'running' AND kind = 'inference'", 60)
    (orphan,) = worker_pids(node)
    node.kill()
    node.start()
    done = "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'"
    assert node.wait_for(done, 1, timeout_s=60) == 1, node.log()
    deadline = time.monotonic() + 15
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(orphan), "the old worker outlived its node"
    time.sleep(LONG_RUN_S + 3)  # the new worker's whole run: time for a second attempt to land
    # The old worker stopped at once, not after finishing its run beside the new one (which
    # would double the load on the machine, and on a GPU the memory).
    assert "the node is gone; stopping without finishing the job" in node.log()
    assert node.log().count("example-threshold ran in") == 1
    study = Study(dcmread(ct[0]).StudyInstanceUID, ct, set(ct))
    check_one_result_set(node, outbox, study)
    assert node.stop() == 0


def test_a_series_cut_off_by_a_crash_waits_for_its_sender_after_the_restart(
    make_node, tmp_path: Path
) -> None:
    """Killed mid-series and down for longer than the quiet time: back up, the node waits the
    quiet time again before completing what was left open, so the modality, resending what was
    not acknowledged a moment later, gets one completion of the whole series, not a result on
    its first part and a second one on all of it."""
    quiet = 3.0
    node = make_node(assembly={"series_quiet_seconds": quiet, "study_quiet_seconds": quiet})
    ct = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=120, rows=64, columns=64))
    modality = Modality(tmp_path)
    modality.studies.append(Study(dcmread(ct[0]).StudyInstanceUID, ct))
    modality.start_sending(node)
    assert node.wait_for("SELECT COUNT(*) >= 10 FROM instances", 1, timeout_s=60) == 1
    node.kill()
    modality.finish_sending()
    assert 0 < len(modality.studies[0].acknowledged) < len(ct), "the kill missed the transfer"
    time.sleep(quiet + 0.5)  # down for longer than the quiet time
    node.start()
    time.sleep(quiet * 0.4)  # the modality's retry comes a moment after the node is back
    modality.start_sending(node)
    assert modality.finish_sending() == 0 and not modality.outstanding
    complete = "SELECT COUNT(*) FROM series WHERE completed_at IS NOT NULL"
    assert node.wait_for(complete, 1, timeout_s=30) == 1
    completions = [
        (job["generation"], json.loads(job["payload"])["instances"])
        for job in node.query(
            "SELECT generation, payload FROM jobs WHERE kind = 'series-complete' ORDER BY id"
        )
    ]
    assert completions == [(1, len(ct))]
    assert node.stop() == 0


@pytest.mark.parametrize("finishes_first", ["late", "holder"])
def test_a_worker_whose_job_was_queued_again_does_not_record_it(
    make_node, tmp_path: Path, monkeypatch, finishes_first: str
) -> None:
    """A worker that goes on running a job after the node queued it again (a worker of its own,
    or one that did not hear its node die) must not record its result: only the attempt that
    holds the job does, so a job never has two sets of objects. Finishing after the holder
    committed, it must not touch the holder's files either (each attempt has its folder)."""
    import importlib
    import threading

    from dicom_node.config import load_config
    from dicom_node.infer import Worker
    from dicom_node.jobs import JobKind, SqliteJobStore
    from tests.support.paths import PLUGINS

    monkeypatch.syspath_prepend(str(PLUGINS))
    importlib.invalidate_caches()
    outbox = tmp_path / "outbox"
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        routing={
            "rules": [{"algorithm": "example-threshold", "series": {"modality": ["CT"]}}],
            "destinations": ["outbox"],
        },
        destinations={"outbox": {"type": "folder", "path": str(outbox)}},
        algorithms={"example-threshold": {"delay_s": 1.0}},
        worker={"enabled": False},  # the workers are this test's
        delivery=RETRIES,
        env=plugin_env(),
    )
    ct = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=12, rows=64, columns=64))
    assert len(send(ct, "127.0.0.1", node.port).sent) == len(ct)
    assert poll(node, "SELECT id FROM jobs WHERE state = 'queued' AND kind = 'inference'", 30)

    config = load_config(node.config_path, environ={})
    slow = config.model_copy(deep=True)
    if finishes_first == "holder":  # the late attempt still runs when the holder commits
        slow.algorithms["example-threshold"]["delay_s"] = 8.0
    late, current = Worker(slow, name="late"), Worker(config, name="current")
    running = threading.Thread(target=late.work_once)
    running.start()
    assert poll(node, "SELECT id FROM jobs WHERE state = 'running' AND worker = 'late'", 30)
    # What a node does when it starts: jobs left running by the last one are queued again.
    jobs = SqliteJobStore(current.db)
    # Only the inference job: the node may be routing another completion at this moment.
    assert jobs.requeue_interrupted([JobKind.INFERENCE]) == 1
    if finishes_first == "late":
        running.join(60)
        assert not node.query("SELECT * FROM outputs") and not node.query("SELECT * FROM results")
        assert node.query("SELECT state FROM jobs WHERE kind = 'inference'")[0][0] == "queued"

    assert current.work_once() is not None
    committed = {path: path.read_bytes() for path in node.outputs().values()}
    running.join(60)
    assert not running.is_alive()
    assert {path: path.read_bytes() for path in node.outputs().values()} == committed
    assert node.query("SELECT state, worker FROM jobs WHERE kind = 'inference'")[0][0] == (
        "succeeded"
    )
    done = "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'"
    assert node.wait_for(done, 1, timeout_s=30) == 1, node.log()
    study = Study(dcmread(ct[0]).StudyInstanceUID, ct, set(ct))
    check_one_result_set(node, outbox, study)
    late.db.close()
    current.db.close()
    assert node.stop() == 0
