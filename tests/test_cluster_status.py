"""What the operator sees of cluster mode (issue 17): the mode and the servers by host:port
(never credentials) in the API, ``dicom-node status`` and the metrics; the cluster's workers
with their host, job, phase and heartbeat; the inference jobs between routing and a worker
(unstaged, staged not claimed, leases expired not yet requeued), counted by the job store on
both databases. The dashboard in a real browser is tests/test_cluster_dashboard.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from dicom_node import api
from dicom_node.config import NodeConfig
from dicom_node.database_postgres import PostgresDatabase
from dicom_node.infer import WorkerRecord
from dicom_node.jobs import DispatchTally, job_store
from dicom_node.metrics import IndexCollector
from dicom_node.status import build_report, format_report
from tests.support.jobs import OpenDatabase, backend, queue
from tests.support.postgres import postgres_server, postgres_url

__all__ = ["backend", "postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.integration  # a PostgreSQL server process


def test_the_dispatch_tally_counts_each_stage(backend: OpenDatabase) -> None:
    db = backend()
    jobs = job_store(db)
    assert jobs.dispatch_tally() == DispatchTally(0, 0, 0)
    first, second, third, fourth = queue(db, "a", "b", "c", "d")
    for job_id in (second, third, fourth):
        jobs.mark_staged(job_id)
    assert jobs.dispatch_tally() == DispatchTally(1, 3, 0)
    # Two claimed with a short lease (staged ones only); one lease runs out by the database
    # clock, the other is renewed: one expired and not yet taken back.
    short = jobs.claim("host-a-0", lease_s=0.05, staged_only=True)
    kept = jobs.claim("host-b-0", lease_s=60, staged_only=True)
    assert short is not None and kept is not None and short.token is not None
    deadline = time.monotonic() + 30
    while jobs.dispatch_tally().leases_expired == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.dispatch_tally() == DispatchTally(1, 1, 1)
    assert jobs.requeue_expired(max_attempts=3) == [short.id]
    assert jobs.dispatch_tally() == DispatchTally(1, 2, 0)
    assert first not in (short.id, kept.id)


def test_mode_workers_and_cluster_jobs_in_api_status_and_metrics(
    tmp_path: Path, postgres_url: str
) -> None:
    host, port = postgres_url.split("@", 1)[1].split("/", 1)[0].split(":")
    secret_url = f"postgresql://postgres:s3cret@{host}:{port}/" + postgres_url.rsplit("/", 1)[1]
    config = NodeConfig.model_validate(
        {
            "store": {"data_dir": str(tmp_path / "data")},
            "cluster": {
                # PostgreSQL trusts local connections here, so a password does no harm.
                "database_url": secret_url,
                "broker_url": "amqp://guest:s3cret@mq.example:5672//",
                "objects": {
                    "url": "s3://images/node-1",
                    "endpoint_url": "http://seaweedfs.example:8333",
                    "access_key_id": "AKIDEXAMPLE",
                    "secret_access_key": "s3cret",
                },
            },
        }
    )
    (tmp_path / "data").mkdir()
    db = PostgresDatabase(postgres_url)
    try:
        unstaged, staged = queue(db, "a", "b")
        jobs = job_store(db)
        jobs.mark_staged(staged)
        jobs.mark_dispatched([staged])
        worker = WorkerRecord(db, "gpu-host-7-0", "cpu", [])
        worker.register()
        claimed = jobs.claim("gpu-host-7-0", lease_s=60, staged_only=True)
        assert claimed is not None and claimed.id == staged
        worker.progress(staged, "running")
        try:
            embedded = NodeConfig.model_validate({"store": {"data_dir": str(tmp_path / "e")}})
            assert api.mode(embedded) == {"mode": "embedded"}
            with db.reading() as conn:
                node = api.node(conn, config)
                (listed,) = api.workers(conn)
                (job,) = [j for j in api.jobs(conn) if j["id"] == staged]
            assert node == {
                "mode": "cluster",
                "postgresql": f"{host}:{port}",
                "rabbitmq": "mq.example:5672",
                "objects": "s3://images/node-1 at seaweedfs.example:8333",
                "jobs": {"unstaged": 1, "staged_unclaimed": 0, "leases_expired": 0},
            }
            assert (listed["name"], listed["host"], listed["device"]) == (
                "gpu-host-7-0",
                socket.gethostname(),
                "cpu",
            )
            assert (listed["job_id"], listed["job_phase"], listed["alive"]) == (
                staged,
                "running",
                True,
            )
            assert job["worker"] == "gpu-host-7-0" and job["staged_at"] is not None
            assert job["dispatched_at"] is not None
            steps = [s["step"] for s in job["timeline"]]
            assert steps[:6] == [
                "received",
                "complete",
                "routed",
                "staged",
                "dispatched",
                "started",
            ]

            report = build_report(config)
            text = format_report(report)
            assert text.splitlines()[0] == (
                f"mode: cluster (PostgreSQL {host}:{port}, RabbitMQ mq.example:5672,"
                " objects s3://images/node-1 at seaweedfs.example:8333)"
            )
            assert (
                "  cluster inference: 1 unstaged, 0 staged not claimed,"
                " 0 lease(s) expired not yet requeued"
            ) in text
            (line,) = [x for x in text.splitlines() if "gpu-host-7-0" in x]
            assert socket.gethostname() in line and f"job {staged} running" in line
            assert "s3cret" not in text and "AKIDEXAMPLE" not in text

            samples = {
                s.labels["stage"]: s.value
                for m in IndexCollector(config).collect()
                if m.name == "dicom_node_cluster_jobs"
                for s in m.samples
            }
            assert samples == {"unstaged": 1, "staged_unclaimed": 0, "lease_expired": 0}
            assert unstaged != staged
        finally:
            worker.stop()
    finally:
        db.close()
