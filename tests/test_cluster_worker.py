"""The cluster worker (dicom_node/cluster_worker.py) on a real PostgreSQL, SeaweedFS (S3) and
RabbitMQ: it claims a staged job, fetches its inputs to a scratch folder, runs it through the
embedded worker's core, uploads the results under results/<job>/attempt-<n>/ and commits
them only while its attempt holds the job; a stale attempt's commit is refused. End to end, a
node in cluster mode and a worker process of its own deliver a real CT's results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.cluster_worker import ClusterWorker
from dicom_node.config import NodeConfig
from dicom_node.database import Database
from dicom_node.jobs import CompletionPayload, InferencePayload, Job, JobKind, JobState, job_store
from dicom_node.objects import ObjectStore, object_store
from dicom_node.scu import send
from dicom_node.staging import stage_job
from dicom_node.store import InstanceStore, Sender
from tests.support.cluster import cluster_settings, start_cluster_worker, stop_cluster_worker
from tests.support.dicomfiles import dataset_bytes
from tests.support.node import NodeProcess, plugin_env, wait_until
from tests.support.paths import corpus_ct
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.rabbitmq import RabbitServer, rabbitmq  # noqa: F401 (fixture)
from tests.support.seaweedfs import SeaweedServer

pytestmark = pytest.mark.integration

ALGORITHM = "example-threshold"
RULE = {"algorithm": ALGORITHM, "series": {"modality": ["CT"], "min_slices": 20}}


def worker_config(
    tmp_path: Path, cluster: dict[str, Any], algorithm: dict[str, Any] | None = None
) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "store": {"data_dir": str(tmp_path / "data"), "fsync": False, "min_free_bytes": 0},
            "worker": {"device": "cpu"},
            "algorithms": {ALGORITHM: {"threshold": 300, **(algorithm or {})}},
            "cluster": cluster,
        }
    )


@pytest.fixture
def cluster(
    postgres_url: str,  # noqa: F811
    rabbitmq: RabbitServer,  # noqa: F811
    seaweedfs: SeaweedServer,
) -> dict[str, Any]:
    return cluster_settings(postgres_url, rabbitmq.url, seaweedfs)


class StagedCt:
    """A node's side, in this process: the corpus CT stored in PostgreSQL, completed, routed
    to the example algorithm and staged in the object store."""

    def __init__(self, config: NodeConfig, corpus: Path) -> None:
        self.store = InstanceStore.for_node(config)
        self.db: Database = self.store.db
        self.jobs = job_store(self.db)
        self.objects: ObjectStore = object_store(config.cluster.objects, create=True)
        files = corpus_ct(corpus)
        for path in files:
            syntax, data = dataset_bytes(path)
            self.store.put(data, syntax, Sender("SCU", "127.0.0.1"))
        series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        with self.db.transaction() as conn:
            self.jobs.enqueue(
                conn,
                JobKind.SERIES_COMPLETE,
                series_uid,
                1,
                CompletionPayload("series", series_uid, 0, "quiet", 0.0),
            )
            self.job_id = self.jobs.enqueue(
                conn,
                JobKind.INFERENCE,
                series_uid,
                1,
                InferencePayload(ALGORITHM, {"series": series_uid}, "series"),
            )
        stage_job(self.job(), self.db, self.jobs, config.store.data_dir, self.objects)

    def job(self) -> Job:
        found = self.jobs.get(self.job_id)
        assert found is not None
        return found

    def recorded(self) -> tuple[list[Any], list[Any]]:
        """The job's results row(s) and outputs as the database has them."""
        with self.db.reading() as conn:
            results = conn.execute(
                "SELECT path, device FROM results WHERE job_id = ?", (self.job_id,)
            ).fetchall()
            outputs = conn.execute(
                "SELECT kind, path FROM outputs WHERE job_id = ? ORDER BY kind", (self.job_id,)
            ).fetchall()
        return results, outputs

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def staged(
    tmp_path: Path, cluster: dict[str, Any], corpus: Path, example_plugins: None
) -> Iterator[StagedCt]:
    node = StagedCt(worker_config(tmp_path / "node", cluster), corpus)
    yield node
    node.close()


def test_a_worker_claims_fetches_runs_uploads_and_commits_a_staged_job(
    tmp_path: Path, cluster: dict[str, Any], staged: StagedCt
) -> None:
    scratch = tmp_path / "host-a"
    scratch.mkdir()
    worker = ClusterWorker(worker_config(tmp_path / "a", cluster), "host-a-0", scratch)
    try:
        job = worker.answer(staged.job_id)
        assert worker.answer(staged.job_id) is None  # the duplicate doorbell: nothing to claim
    finally:
        worker.close()
    assert job is not None and job.id == staged.job_id
    done = staged.job()
    assert done.state is JobState.SUCCEEDED and done.attempts == 1 and done.worker == "host-a-0"
    (result,), outputs = staged.recorded()
    prefix = f"results/{staged.job_id}/attempt-1/"
    assert result["path"] == prefix + "result.json" and result["device"] == "cpu"
    assert {o["kind"] for o in outputs} == {"SEG", "SR"}
    # Every recorded file is in the object store at its recorded path, and is the SEG/SR.
    for output in outputs:
        assert output["path"].startswith(prefix + "dicom/")
        local = tmp_path / "fetched" / output["path"]
        staged.objects.get_file(output["path"], local)
        assert dcmread(local).Modality == output["kind"]
    assert staged.objects.exists(result["path"])
    assert list(scratch.iterdir()) == []  # the scratch folder is cleaned
    with staged.db.reading() as conn:
        (row,) = conn.execute(
            "SELECT stopped_at, algorithms FROM workers WHERE name = 'host-a-0'"
        ).fetchall()
    assert row["stopped_at"] is not None and ALGORITHM in row["algorithms"]


def test_a_stale_attempts_commit_is_refused(
    tmp_path: Path, cluster: dict[str, Any], staged: StagedCt
) -> None:
    """Host a claims the job and freezes past its lease; the job is taken back and host b
    runs and commits it; then a thaws and finishes: its commit is refused, b's result
    stands."""
    config_a = worker_config(tmp_path / "a", cluster)
    config_b = worker_config(tmp_path / "b", cluster)
    frozen = staged.jobs.claim("host-a-0", (JobKind.INFERENCE,), lease_s=0.3, staged_only=True)
    assert frozen is not None and frozen.id == staged.job_id
    time.sleep(0.6)
    assert staged.jobs.requeue_expired(max_attempts=3) == [staged.job_id]
    worker_b = ClusterWorker(config_b, "host-b-0", tmp_path / "b")
    try:
        taken = worker_b.answer(staged.job_id)
    finally:
        worker_b.close()
    assert taken is not None and taken.attempts == 2
    worker_a = ClusterWorker(config_a, "host-a-0", tmp_path / "a")
    try:
        worker_a._run(frozen, tmp_path / "a-scratch")  # a thaws and finishes its attempt
    finally:
        worker_a.close()
    done = staged.job()
    assert done.state is JobState.SUCCEEDED and done.worker == "host-b-0" and done.attempts == 2
    (result,), outputs = staged.recorded()
    assert result["path"] == f"results/{staged.job_id}/attempt-2/result.json"
    assert all(o["path"].startswith(f"results/{staged.job_id}/attempt-2/") for o in outputs)


def test_a_failed_attempt_is_recorded_as_the_embedded_worker_records_it(
    tmp_path: Path, cluster: dict[str, Any], staged: StagedCt
) -> None:
    """The job's manifest is gone from the object store (purged): fetching its inputs fails
    with ObjectMissing, a setup fault, recorded by the attempt that holds the job (its token)
    and not retried, as errors.py says and the embedded worker does."""
    staged.objects.delete_prefix(f"jobs/{staged.job_id}")
    worker = ClusterWorker(worker_config(tmp_path / "a", cluster), "host-a-0", tmp_path / "a")
    try:
        assert worker.answer(staged.job_id) is not None
    finally:
        worker.close()
    failed = staged.job()
    assert failed.error is not None and failed.error.startswith("ObjectMissing")
    assert failed.state is JobState.FAILED and failed.attempts == 1
    assert list((tmp_path / "a").iterdir()) == []


def test_a_node_and_a_worker_host_deliver_a_ct_end_to_end(
    make_node: Any, tmp_path: Path, cluster: dict[str, Any], corpus: Path
) -> None:
    outbox = tmp_path / "outbox"
    node: NodeProcess = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        routing={"rules": [RULE], "destinations": ["share"]},
        destinations={"share": {"type": "folder", "path": str(outbox)}},
        algorithms={ALGORITHM: {"threshold": 300}},
        worker={"device": "cpu"},
        cluster=cluster,
        env=plugin_env(),
    )
    host = start_cluster_worker(node.config_path, "host-a", tmp_path / "host-a")
    try:
        files = corpus_ct(corpus)
        assert len(send(files, "127.0.0.1", node.port).sent) == len(files)
        wait_until(
            lambda: len(list(outbox.rglob("*.dcm"))) == 2,
            120,
            "the SEG and SR delivered",
            node.log(),
        )
    finally:
        stop_cluster_worker(host)
    (job,) = node.query("SELECT id, state, attempts, worker FROM jobs WHERE kind = 'inference'")
    assert (job["state"], job["attempts"], job["worker"]) == ("succeeded", 1, "host-a-0")
    delivered = {dcmread(p).Modality for p in outbox.rglob("*.dcm")}
    assert delivered == {"SEG", "SR"}
    # The node did not run it: no local worker, and it fetched the results to send them.
    assert "started inference worker" not in node.log()
    outputs = node.query("SELECT path FROM outputs WHERE job_id = ?", (job["id"],))
    assert all((node.data_dir / o["path"]).is_file() for o in outputs)
    log = (tmp_path / "host-a.log").read_text()
    assert f"job {job['id']}: {ALGORITHM} ran in" in log
    node.stop()


def test_cluster_check_says_one_line_per_server_and_fails_on_any(
    tmp_path: Path,
    cluster: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    example_plugins: None,
) -> None:
    import yaml

    from dicom_node.cli import main
    from dicom_node.testing import free_port

    path = tmp_path / "node.yaml"
    object_store(worker_config(tmp_path, cluster).cluster.objects, create=True)
    InstanceStore.for_node(worker_config(tmp_path, cluster)).close()  # the node made the schema
    path.write_text(yaml.safe_dump({"cluster": cluster}))
    assert main(["cluster", "check", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [
        ["ok", "postgresql:"],
        ["ok", "rabbitmq:"],
        ["ok", "objects:"],
    ]
    assert "schema 5" in lines[0] and "dicom-node.example-threshold" in lines[1]

    path.write_text(
        yaml.safe_dump({"cluster": {**cluster, "broker_url": f"amqp://127.0.0.1:{free_port()}//"}})
    )
    assert main(["cluster", "check", "--config", str(path)]) != 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok") and lines[2].startswith("ok")
    assert lines[1].startswith("FAIL rabbitmq:")


def test_a_host_runs_one_child_per_gpu_each_with_its_own_device(
    make_node: Any, tmp_path: Path, cluster: dict[str, Any]
) -> None:
    """Two GPUs visible to the host: two Celery children, each given one as the embedded
    supervisor gives its workers, registered under the host's name and their index."""
    node: NodeProcess = make_node(worker={"device": "auto"}, cluster=cluster, env=plugin_env())
    host = start_cluster_worker(
        node.config_path,
        "gpus",
        tmp_path / "gpus",
        processes=2,
        env={"CUDA_VISIBLE_DEVICES": "3,5"},
    )
    try:
        log = (tmp_path / "gpus.log").read_text()
        assert "gpus-0 ready on cpu (CUDA_VISIBLE_DEVICES=3)" in log
        assert "gpus-1 ready on cpu (CUDA_VISIBLE_DEVICES=5)" in log
        rows = node.query("SELECT name FROM workers WHERE stopped_at IS NULL ORDER BY name")
        assert [r["name"] for r in rows] == ["gpus-0", "gpus-1"]
    finally:
        assert stop_cluster_worker(host) == 0
    stopped = node.query("SELECT COUNT(*) FROM workers WHERE stopped_at IS NOT NULL")
    assert stopped[0][0] == 2
    node.stop()
