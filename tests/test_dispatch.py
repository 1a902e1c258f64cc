"""Dispatch in cluster mode (dicom_node/dispatch.py) on a real RabbitMQ and PostgreSQL: the
broker is a doorbell, the database the ledger. A doorbell leads to one claim, a duplicate to
none; the node's sweeper stages before it rings, rings each job once, rings again a job whose
message was lost, and takes back a job whose lease ran out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.config import NodeConfig
from dicom_node.database import Database
from dicom_node.database_postgres import PostgresDatabase
from dicom_node.dispatch import (
    MESSAGE_PRIORITY,
    Sweeper,
    celery_app,
    queue_name,
    queues,
    ring,
    time_limit_warning,
)
from dicom_node.jobs import InferencePayload, JobKind, JobState, job_store
from dicom_node.objects import FolderObjectStore
from dicom_node.staging import manifest_key
from dicom_node.store import InstanceStore, Sender
from tests.support.jobs import completed_job, put_files, queue
from tests.support.paths import corpus_ct
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.rabbitmq import RabbitServer, rabbitmq, server_folder  # noqa: F401

ALGORITHM = "example-threshold"
WORKER = "test-worker"


def config_for(tmp_path: Path, database_url: str, broker_url: str, **cluster: Any) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "store": {"data_dir": str(tmp_path / "data"), "fsync": False, "min_free_bytes": 0},
            "cluster": {
                "database_url": database_url,
                "broker_url": broker_url,
                "objects": {"url": (tmp_path / "objects").as_uri()},
                "redispatch_s": 1.0,
                **cluster,
            },
        }
    )


class Broker:
    """The test's view of the algorithm's queue: what waits there, taken off one by one."""

    def __init__(self, app: Any, *, purge: bool = True) -> None:
        self.connection = app.connection_for_read()
        self.channel = self.connection.channel()
        self.queue = queues([ALGORITHM])[0](self.channel)
        self.queue.declare()
        if purge:
            self.queue.purge()

    def take(self) -> list[Any]:
        """Every message waiting, unacknowledged (the test acks or rejects them)."""
        taken = []
        while (message := self.queue.get(no_ack=False)) is not None:
            taken.append(message)
        return taken

    def waiting(self) -> int:
        return len([m.ack() for m in self.take()])

    def close(self) -> None:
        self.channel.close()
        self.connection.close()


@pytest.fixture
def db(postgres_url: str) -> Iterator[Database]:  # noqa: F811
    database = PostgresDatabase(postgres_url)
    yield database
    database.close()


@pytest.fixture
def config(tmp_path: Path, postgres_url: str, rabbitmq: RabbitServer) -> NodeConfig:  # noqa: F811
    return config_for(tmp_path, postgres_url, rabbitmq.url)


@pytest.fixture
def broker(config: NodeConfig) -> Iterator[Broker]:
    found = Broker(celery_app(config.cluster, [ALGORITHM]))
    yield found
    found.close()


def staged_job(db: Database) -> int:
    """One queued job of ``ALGORITHM`` with its inputs marked staged, so that it is due to
    ring; its ID."""
    (job_id,) = queue(db, ALGORITHM)
    job_store(db).mark_staged(job_id)
    return job_id


def sweeper_for(config: NodeConfig, db: Database) -> Sweeper:
    return Sweeper(
        config,
        db,
        job_store(db),
        config.store.data_dir,
        FolderObjectStore(
            Path(str(config.cluster.objects.url).removeprefix("file://")), create=True
        ),
        celery_app(config.cluster, []),
        {ALGORITHM: 120.0},
        3600.0,
    )


def rung_job(config: NodeConfig, db: Database) -> tuple[int, Sweeper]:
    """A :func:`staged_job` rung by a new sweeper's first step; its ID and the sweeper."""
    job_id = staged_job(db)
    sweeper = sweeper_for(config, db)
    sweeper.step()
    return job_id, sweeper


@pytest.mark.integration
def test_a_doorbell_leads_to_one_claim_and_its_duplicate_to_none(
    config: NodeConfig, db: Database, broker: Broker
) -> None:
    jobs = job_store(db)
    job_id = staged_job(db)
    job = jobs.get(job_id)
    assert job is not None
    app = celery_app(config.cluster, [])
    ring(app, job, 120.0)
    ring(app, job, 120.0)  # a duplicate (the sweeper rang again, the broker redelivered)

    messages = broker.take()
    assert len(messages) == 2
    claimed = []
    for message in messages:
        args, _kwargs, _embed = message.decode()
        assert args == [job_id]
        assert message.headers["task"] == "dicom_node.run_job"
        assert message.headers["timelimit"][0] == 120.0  # the algorithm's limit, hard
        assert message.properties["priority"] == MESSAGE_PRIORITY["routine"]
        assert message.properties["delivery_mode"] == 2  # persistent
        claimed.append(
            jobs.claim(
                WORKER, (JobKind.INFERENCE,), algorithms=[ALGORITHM], lease_s=30, staged_only=True
            )
        )
        message.ack()
    first, second = claimed
    assert first is not None and first.id == job_id and first.token is not None
    assert second is None  # the duplicate claims nothing


@pytest.mark.integration
def test_a_stat_job_rings_at_a_higher_priority_on_its_algorithms_durable_queue(
    config: NodeConfig, db: Database, broker: Broker
) -> None:
    jobs = job_store(db)
    with db.transaction() as conn:
        job_id = jobs.enqueue(
            conn,
            JobKind.INFERENCE,
            "1.2.3",
            1,
            InferencePayload(ALGORITHM, {"series": "1.2.3"}, "series"),
            priority="stat",
        )
    job = jobs.get(job_id)
    assert job is not None
    ring(celery_app(config.cluster, []), job, 60.0)
    (message,) = broker.take()
    assert message.properties["priority"] == MESSAGE_PRIORITY["stat"] > MESSAGE_PRIORITY["urgent"]
    assert message.delivery_info["routing_key"] == queue_name(ALGORITHM)
    message.ack()
    # The queue as the workers declare it: durable, with priorities (a redeclaration with
    # other arguments would be refused by the broker).
    declared = queues([ALGORITHM])[0]
    assert declared.durable and declared.queue_arguments == {"x-max-priority": 10}


@pytest.mark.integration
def test_the_sweeper_rings_a_job_once_and_again_when_its_message_was_lost(
    config: NodeConfig, db: Database, broker: Broker
) -> None:
    jobs = job_store(db)
    job_id, sweeper = rung_job(config, db)
    sweeper.step()  # rung a moment ago: not again
    assert broker.waiting() == 1  # taken off: the message is lost
    job = jobs.get(job_id)
    assert job is not None and job.dispatched_at is not None and job.state is JobState.QUEUED
    time.sleep(config.cluster.redispatch_s + 0.2)
    sweeper.step()  # still queued, rung more than redispatch_s ago: rung again
    assert broker.waiting() == 1
    again = jobs.get(job_id)
    assert again is not None and again.dispatched_at is not None
    assert again.dispatched_at > job.dispatched_at


@pytest.mark.integration
def test_the_sweeper_takes_back_a_job_whose_lease_ran_out_and_rings_it(
    config: NodeConfig, db: Database, broker: Broker
) -> None:
    jobs = job_store(db)
    job_id, sweeper = rung_job(config, db)
    assert broker.waiting() == 1
    held = jobs.claim(WORKER, (JobKind.INFERENCE,), lease_s=0.3, staged_only=True)
    assert held is not None and held.id == job_id
    sweeper.step()  # its lease holds: nothing to do
    assert jobs.get(job_id).state is JobState.RUNNING  # type: ignore[union-attr]
    assert broker.waiting() == 0
    time.sleep(0.5)  # the worker froze: no renewal
    sweeper.step()
    back = jobs.get(job_id)
    assert back is not None and back.state is JobState.QUEUED and back.attempts == 1
    assert broker.waiting() == 1  # rung at once for another worker
    with db.transaction() as conn:  # the frozen attempt's token no longer holds it
        assert not jobs.holds(conn, job_id, WORKER, held.token)


@pytest.mark.integration
def test_the_sweeper_stages_a_job_before_it_rings_it(
    config: NodeConfig, db: Database, broker: Broker, corpus: Path
) -> None:
    store = InstanceStore(config.store.data_dir, db, fsync=False)
    files = corpus_ct(corpus)
    put_files(store, files, Sender("SCU", "127.0.0.1"))
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    jobs = job_store(db)
    job_id = completed_job(store, series_uid, ALGORITHM).id
    sweeper = sweeper_for(config, db)
    assert jobs.claim(WORKER, (JobKind.INFERENCE,), staged_only=True) is None  # not staged
    sweeper.step()
    job = jobs.get(job_id)
    assert job is not None and job.staged_at is not None and job.dispatched_at is not None
    assert sweeper.objects.exists(manifest_key(job_id))
    assert broker.waiting() == 1


@pytest.mark.integration
def test_a_job_whose_inputs_are_gone_fails_instead_of_waiting_unstaged(
    config: NodeConfig, db: Database, broker: Broker
) -> None:
    series_uid = generate_uid()  # routed, then its instances removed before staging
    jobs = job_store(db)
    with db.transaction() as conn:
        job_id = jobs.enqueue(
            conn,
            JobKind.INFERENCE,
            series_uid,
            1,
            InferencePayload(ALGORITHM, {"series": series_uid}, "series"),
        )
    sweeper_for(config, db).step()
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.FAILED and job.staged_at is None
    assert job.error is not None and job.error.startswith("cannot be staged: ")
    assert series_uid not in job.error  # hashed, as in the log
    assert broker.waiting() == 0  # nothing rung for it


@pytest.mark.integration
def test_the_sweeper_rings_again_after_the_broker_lost_its_data(
    tmp_path: Path,
    db: Database,
    postgres_url: str,  # noqa: F811
) -> None:
    """RabbitMQ killed and started again without its data: the queue and the doorbell are
    gone, no worker has declared the queue again; the sweeper declares it and rings again."""
    server = RabbitServer(server_folder()).start()
    try:
        config = config_for(tmp_path, postgres_url, server.url)
        job_id, sweeper = rung_job(config, db)
        server.wipe()
        server.start()
        time.sleep(config.cluster.redispatch_s + 0.2)
        for _ in range(20):  # the first publish may meet the connection the restart broke
            sweeper.loop.run_once()
            if sweeper.loop.state.backing_off is None:
                break
            time.sleep(0.5)
        assert sweeper.loop.state.backing_off is None
        broker = Broker(celery_app(config.cluster, [ALGORITHM]), purge=False)
        try:
            (message,) = broker.take()
            assert message.decode()[0] == [job_id]
            message.ack()
        finally:
            broker.close()
    finally:
        server.close()


@pytest.mark.unit
def test_a_time_limit_reaching_rabbitmqs_consumer_timeout_is_named() -> None:
    assert time_limit_warning({"quick": 60.0, "slow": 600.0}) is None
    warning = time_limit_warning({"quick": 60.0, "lung-nodules-ct": 3600.0})
    assert warning is not None
    assert "lung-nodules-ct 3600 s" in warning and "quick" not in warning
    assert "consumer_timeout above 3600 s" in warning
