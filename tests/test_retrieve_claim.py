"""Retrieval jobs in the job store (issue 19 part 2), on SQLite and on a real PostgreSQL: never
two retrievals of one study at once, a per-source limit, the backoff after a failed attempt,
and a study's completion waiting while a retrieval of the study is open."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.database import Database
from dicom_node.jobs import (
    CompletionPayload,
    JobKind,
    JobState,
    RetrievalPayload,
    job_store,
)
from dicom_node.retrieve import Retriever
from dicom_node.store import InstanceStore
from tests.support.jobs import OpenDatabase, backend
from tests.support.postgres import postgres_server, postgres_url

__all__ = ["backend", "postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.unit

WORKER = "retriever"


@pytest.fixture
def db(backend: OpenDatabase) -> Database:
    return backend()


def retrieval(db: Database, study: str, source: str = "pacs") -> int:
    with db.transaction() as conn:
        return job_store(db).enqueue(
            conn,
            JobKind.RETRIEVE,
            study,
            1,
            RetrievalPayload(source, "brain-tumour-mr", ("FLAIR",), ("MR",)),
        )


def no_wait(attempts: int) -> float:
    return 0.0


def test_a_retrieval_payload_round_trips_through_the_table(db: Database) -> None:
    job_id = retrieval(db, "1.2.3")
    job = job_store(db).get(job_id)
    assert job is not None and job.kind == "retrieve"
    assert job.payload == RetrievalPayload("pacs", "brain-tumour-mr", ("FLAIR",), ("MR",))
    with pytest.raises(TypeError), db.transaction() as conn:
        job_store(db).enqueue(
            conn, JobKind.RETRIEVE, "1.2.3", 1, CompletionPayload("study", "1.2.3", 1, "x", 0)
        )


def test_one_study_is_never_retrieved_twice_at_once(db: Database) -> None:
    store = job_store(db)
    first = retrieval(db, "1.2.3", "pacs")
    second = retrieval(db, "1.2.3", "archive")  # the same study from another source
    other = retrieval(db, "4.5.6", "archive")
    limits = {"pacs": 4, "archive": 4}
    taken = store.claim_retrieval(WORKER, concurrency=limits, retry_after=no_wait)
    assert taken is not None and taken.id == first
    taken = store.claim_retrieval(WORKER, concurrency=limits, retry_after=no_wait)
    assert taken is not None and taken.id == other, "the study's second waits for its first"
    assert store.claim_retrieval(WORKER, concurrency=limits, retry_after=no_wait) is None
    store.succeed(first)
    taken = store.claim_retrieval(WORKER, concurrency=limits, retry_after=no_wait)
    assert taken is not None and taken.id == second


def test_a_source_runs_no_more_retrievals_than_its_limit(db: Database) -> None:
    store = job_store(db)
    ids = [retrieval(db, f"1.2.{n}") for n in range(3)]
    taken = [store.claim_retrieval(WORKER, concurrency={"pacs": 2}, retry_after=no_wait)]
    taken.append(store.claim_retrieval(WORKER, concurrency={"pacs": 2}, retry_after=no_wait))
    assert [j.id for j in taken if j is not None] == ids[:2]
    assert store.claim_retrieval(WORKER, concurrency={"pacs": 2}, retry_after=no_wait) is None
    # A source not named has a limit of one.
    retrieval(db, "7.8.9", "unnamed")
    one = store.claim_retrieval(WORKER, concurrency={"pacs": 2}, retry_after=no_wait)
    assert one is not None and one.payload.source == "unnamed"  # type: ignore[union-attr]
    retrieval(db, "7.8.10", "unnamed")
    assert store.claim_retrieval(WORKER, concurrency={"pacs": 2}, retry_after=no_wait) is None


def test_a_failed_attempt_waits_its_backoff(db: Database) -> None:
    store = job_store(db)
    job_id = retrieval(db, "1.2.3")
    job = store.claim_retrieval(WORKER, concurrency={}, retry_after=lambda n: 3600.0 * n)
    assert job is not None and job.attempts == 1
    state = store.fail(job_id, "no answer", worker=WORKER, max_attempts=3, token=job.token)
    assert state is JobState.QUEUED
    assert store.claim_retrieval(WORKER, concurrency={}, retry_after=lambda n: 3600.0 * n) is None
    again = store.claim_retrieval(WORKER, concurrency={}, retry_after=no_wait)
    assert again is not None and again.id == job_id and again.attempts == 2
    assert again.token != job.token


def test_a_study_completion_waits_while_a_retrieval_of_it_is_open(db: Database) -> None:
    store = job_store(db)
    with db.transaction() as conn:
        held = store.enqueue(
            conn,
            JobKind.STUDY_COMPLETE,
            "1.2.3",
            2,
            CompletionPayload("study", "1.2.3", 24, "association released", 0.0),
        )
        free = store.enqueue(
            conn,
            JobKind.STUDY_COMPLETE,
            "4.5.6",
            1,
            CompletionPayload("study", "4.5.6", 8, "association released", 0.0),
        )
    job_id = retrieval(db, "1.2.3")
    kinds = (JobKind.SERIES_COMPLETE, JobKind.STUDY_COMPLETE)
    taken = store.claim("router", kinds)
    assert taken is not None and taken.id == free
    assert store.claim("router", kinds) is None, "held while the retrieval is queued"
    running = store.claim_retrieval(WORKER, concurrency={}, retry_after=no_wait)
    assert running is not None and running.id == job_id
    assert store.claim("router", kinds) is None, "held while the retrieval runs"
    store.succeed(job_id)
    taken = store.claim("router", kinds)
    assert taken is not None and taken.id == held


def test_a_retrieval_whose_source_left_the_configuration_fails_at_once(tmp_path: Path) -> None:
    """No source of that name any more: refused for good, not retried, and the study's
    completion it held is routed."""
    store = InstanceStore.open(tmp_path / "data")
    try:
        retriever = Retriever(NodeConfig(), store)
        job_id = retrieval(store.db, "1.2.3", "gone")
        with store.db.transaction() as conn:
            held = retriever.jobs.enqueue(
                conn,
                JobKind.STUDY_COMPLETE,
                "1.2.3",
                2,
                CompletionPayload("study", "1.2.3", 24, "association released", 0.0),
            )
        job = retriever.jobs.claim_retrieval(
            WORKER, concurrency=retriever.limits, retry_after=retriever.backoff_s
        )
        assert job is not None and job.id == job_id
        retriever.run(job)
        ended = retriever.jobs.get(job_id)
        assert ended is not None and ended.state is JobState.FAILED and ended.attempts == 1
        assert "no source named 'gone'" in (ended.error or "")
        routed = retriever.jobs.claim("router", (JobKind.STUDY_COMPLETE,))
        assert routed is not None and routed.id == held
    finally:
        store.close()
