"""The job store as the one seam onto jobs and deliveries, and its typed payloads."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from dicom_node.database import Database
from dicom_node.jobs import (
    CompletionPayload,
    DeliveryState,
    InferencePayload,
    JobKind,
    JobState,
    job_store,
    payload_from_json,
)
from tests.support.jobs import OpenDatabase, backend
from tests.support.postgres import postgres_server, postgres_url

__all__ = ["backend", "postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "dicom_node"

# SQL that reads or writes a table of the store (its statements are upper case throughout).
_STORE_SQL = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:jobs|deliveries)\b")
# Where the tables may be named: the store itself, and the schema every table is made by.
_ALLOWED = {"jobs.py", "database.py"}
# The test harness for real nodes (tests and benchmarks import it; the node never does)
# reads the index from outside, as a test does.
_HARNESS = {"testing.py"}


def store_sql(path: Path) -> list[str]:
    """The string literals of a module that hold SQL on the jobs or deliveries tables."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and _STORE_SQL.search(node.value)
    ]


def test_only_the_job_store_touches_the_jobs_and_deliveries_tables() -> None:
    """A cluster mode's store plugs in at :class:`dicom_node.jobs.JobStore`: a module that ran
    its own SQL on the tables would go on reading the embedded database beside it."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20  # the package, not an empty folder
    # The scanner finds what it looks for: the store's own statements.
    assert len(store_sql(PACKAGE / "jobs.py")) > 10
    outside = {
        str(path.relative_to(PACKAGE)): found
        for path in modules
        if str(path.relative_to(PACKAGE)) not in _ALLOWED | _HARNESS and (found := store_sql(path))
    }
    assert outside == {}


def test_inference_payload_round_trip_keeps_the_stored_format() -> None:
    payload = InferencePayload(
        "lung-nodules-ct",
        {"series": "1.2.3.4"},
        "study",
        ("pacs", "sender"),
        ("CT1", "CT2"),
    )
    text = payload.to_json()
    # The format databases written before the payload was typed hold, key for key.
    assert text == json.dumps(
        {
            "algorithm": "lung-nodules-ct",
            "inputs": {"series": "1.2.3.4"},
            "level": "study",
            "destinations": ["pacs", "sender"],
            "senders": ["CT1", "CT2"],
        }
    )
    assert InferencePayload.from_json(text) == payload
    assert payload_from_json(JobKind.INFERENCE.value, text) == payload
    assert payload.delivery_targets() == [("pacs", ""), ("sender", "CT1"), ("sender", "CT2")]


def test_inference_payload_is_a_value() -> None:
    inputs = {"t1": "1.2.3", "flair": "1.2.4"}
    payload = InferencePayload("brain-tumour-mr", inputs, "study")
    inputs["t1"] = "9.9.9"  # the caller's dict changes afterwards; the payload does not
    assert payload.inputs == {"t1": "1.2.3", "flair": "1.2.4"}
    with pytest.raises(AttributeError):
        payload.algorithm = "other"  # type: ignore[misc]
    # A route without destinations: no deliveries, and absent lists read back empty.
    bare = InferencePayload.from_json('{"algorithm": "a", "inputs": {}, "level": "series"}')
    assert bare == InferencePayload("a", {}, "series") and bare.delivery_targets() == []


@pytest.mark.parametrize("level", ["series", "study"])
def test_completion_payload_round_trip_keeps_the_stored_format(level: str) -> None:
    payload = CompletionPayload(level, "1.2.3", 12, "quiet timer", 2.5)
    text = payload.to_json()
    assert json.loads(text) == {
        f"{level}_uid": "1.2.3",
        "instances": 12,
        "trigger": "quiet timer",
        "completion_latency_s": 2.5,
    }
    assert CompletionPayload.from_json(text) == payload
    kind = JobKind.STUDY_COMPLETE if level == "study" else JobKind.SERIES_COMPLETE
    assert payload_from_json(kind.value, text) == payload


def test_bad_payloads_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'series' or 'study', not 'patient'"):
        InferencePayload("a", {}, "patient")
    with pytest.raises(ValueError, match="'series' or 'study'"):
        CompletionPayload("instance", "1.2", 1, "", 0.0)
    with pytest.raises(ValueError, match="unknown job kind 'export'"):
        payload_from_json("export", "{}")
    with pytest.raises(ValueError, match="a JSON object"):
        InferencePayload.from_json("[1, 2]")
    with pytest.raises(KeyError, match="algorithm"):
        InferencePayload.from_json('{"inputs": {}, "level": "series"}')


def test_the_store_keeps_payloads_and_delivery_states_typed(backend: OpenDatabase) -> None:
    db = backend()
    store = job_store(db)
    payload = InferencePayload("a", {"series": "1.2.3"}, "series", ("pacs", "sender"), ("CT1",))
    completion = CompletionPayload("series", "1.2.3", 3, "association released", 0.1)
    with db.transaction() as conn:
        with pytest.raises(TypeError, match="inference job carries a InferencePayload"):
            store.enqueue(conn, JobKind.INFERENCE, "1.2.3", 1, completion)
        store.enqueue(conn, JobKind.SERIES_COMPLETE, "1.2.3", 1, completion)
        job_id = store.enqueue(conn, JobKind.INFERENCE, "1.2.3", 1, payload)
    job = store.claim("w", (JobKind.INFERENCE,))
    assert job is not None and job.id == job_id and job.inference == payload
    assert store.completed_at(job) is not None  # the completion enqueued beside it
    routing = store.get(job_id - 1)
    assert routing is not None and routing.payload == completion
    with pytest.raises(TypeError, match="not an inference job"):
        routing.inference  # noqa: B018
    with db.transaction() as conn:
        assert store.holds(conn, job_id, "w") and not store.holds(conn, job_id, "other")
        assert store.schedule_deliveries(conn, job_id, job.inference) == 2
        store.mark_succeeded(conn, job_id)
    assert store.get(job_id).state is JobState.SUCCEEDED
    pacs, sender = store.deliveries_of([job_id])[job_id]
    assert (pacs.label, sender.label) == ("pacs", "sender (CT1)")
    assert pacs.state is DeliveryState.PENDING and store.due_deliveries(pacs.next_attempt_at)
    store.delivery_sent(pacs.id, at=pacs.next_attempt_at + 1)
    store.delivery_failed(sender.id, attempts=1, error="refused", dead=True, next_attempt_at=0)
    assert store.delivery_counts() == {DeliveryState.SENT: 1, DeliveryState.DEAD: 1}
    assert store.due_deliveries(float("inf")) == []
    assert store.replay_deliveries(all_dead=True) == 1
    (replayed,) = store.deliveries(state=DeliveryState.PENDING)
    assert replayed.id == sender.id and replayed.last_error == "replayed: refused"
    progress = store.delivery_progress([job_id])[job_id]
    assert progress.open == 1 and progress.last_sent_at == pacs.next_attempt_at + 1


def _received(db: Database, series: str, study: str, *times: float) -> None:
    """Instances of a series of a study, received at ``times`` (the index's rows only)."""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO series (series_uid, series_key, study_uid, first_received,"
            " last_received) VALUES (?, 'k', ?, ?, ?)",
            (series, study, min(times), max(times)),
        )
        conn.executemany(
            "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid,"
            " transfer_syntax, path, size, calling_aet, peer_host, received_at)"
            " VALUES (?, ?, ?, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', 'p', 1,"
            " 'CT1', '127.0.0.1', ?)",
            [(f"{series}.{n}", series, study, at) for n, at in enumerate(times)],
        )


def test_every_read_of_the_store_gives_the_same_on_both_databases(backend: OpenDatabase) -> None:
    """The readers of the API, status and metrics (JSON functions, aggregates, the joins of
    a job to its completion and its instances) on one history with explicit times."""
    db = backend()
    now = [1000.0]
    store = type(job_store(db))(db, clock=lambda: now[0])  # type: ignore[call-arg]
    _received(db, "1.2.3", "1.2", 900.0, 950.0)
    completion = CompletionPayload("series", "1.2.3", 2, "association released", 0.1)
    payload = InferencePayload("a", {"series": "1.2.3"}, "series", ("pacs",))
    with db.transaction() as conn:
        store.enqueue(conn, JobKind.SERIES_COMPLETE, "1.2.3", 1, completion)
    routed = store.claim("router", (JobKind.SERIES_COMPLETE,))
    assert routed is not None
    now[0] = 1010.0
    with db.transaction() as conn:
        job_id = store.enqueue(conn, JobKind.INFERENCE, "1.2.3", 1, payload, "stat")
        store.mark_succeeded(conn, routed.id)
    other = store.claim("w2", (JobKind.INFERENCE,))
    assert other is not None and other.id == job_id
    assert store.held_by("w2") == [other]
    assert store.requeue_worker("w2", "died", max_attempts=3) == 1
    now[0] = 1020.0
    job = store.claim("w1", (JobKind.INFERENCE,))
    assert job is not None and job.id == job_id and job.attempts == 2
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO results (job_id, algorithm, path, created_at, device, run_s)"
            " VALUES (?, 'a', 'results/1/result.json', 1030.0, 'cpu', 2.5)",
            (job_id,),
        )
        assert store.holds(conn, job_id, "w1", token=job.token)
        store.schedule_deliveries(conn, job_id, payload)
        store.schedule_deliveries(conn, job_id, payload)  # once: the second is a no-op
        store.mark_succeeded(conn, job_id)
    (delivery,) = store.deliveries_of([job_id])[job_id]
    store.delivery_failed(delivery.id, attempts=1, error="refused", dead=False, next_attempt_at=0)

    (record,) = store.inference_records(study_uid="1.2")
    assert record.job.id == job_id and record.job.priority == "stat"
    assert (record.study_uid, record.first_received, record.last_received) == ("1.2", 900, 950)
    assert (record.completed_at, record.written_at, record.run_s, record.device) == (
        1000.0,
        1030.0,
        2.5,
        "cpu",
    )
    assert record.routed_at is not None
    assert store.inference_records(state=JobState.QUEUED) == []
    assert [r.job.id for r in store.inference_records(job_id=job_id)] == [job_id]
    jobs, deliveries = store.study_tallies(["1.2", "9.9"])
    assert jobs == {("1.2", JobState.SUCCEEDED): 1}
    assert deliveries == {("1.2", DeliveryState.PENDING): 1}
    activity = store.activity(["1.2.3"])
    assert (activity.busy, activity.undelivered, activity.last_sent_at) == (0, 1, None)
    assert activity.last_finished_at is not None
    (pacs,) = store.destinations()
    assert (pacs.destination, pacs.pending, pacs.retrying, pacs.sent, pacs.dead) == (
        "pacs",
        1,
        1,
        0,
        0,
    )
    assert pacs.last_error == "refused"
    progress = store.delivery_progress([job_id])
    assert list(progress) == [job_id] and progress[job_id].open == 1
    assert progress[job_id].last_sent_at is None
    assert store.delivery_tally() == [("pacs", DeliveryState.PENDING, 1)]
    assert [j.id for j in store.recent(JobKind.INFERENCE, subject_uids=["1.2.3"])] == [job_id]
    assert store.recent(JobKind.INFERENCE, subject_uids=["9.9"]) == []
    assert len(store.recent(JobKind.SERIES_COMPLETE)) == 1
    assert store.recent(JobKind.SERIES_COMPLETE, limit=0) == []
    assert store.completed_at(job) == 1000.0
    assert sorted(store.tally()) == [
        ("inference", JobState.SUCCEEDED, "stat", 1),
        ("series-complete", JobState.SUCCEEDED, "routine", 1),
    ]
    assert store.counts()[JobState.SUCCEEDED] == 2
    assert store.replay_deliveries(job_id=job_id) == 1

    # A running job its worker left behind: cancelled while it ran (the supervisor's view),
    # then what a node restart does with the running ones.
    left = _queue_one(db, payload)
    assert store.claim("w3", (JobKind.INFERENCE,)) is not None
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO workers (name, pid, host, device, started_at, heartbeat_at, algorithms,"
            " job_id) VALUES ('w3', 1, 'h', 'cpu', 0, 0, '{}', ?)",
            (left,),
        )
    assert store.cancelled_on("w3") == []
    store.cancel(left, "alice")
    assert [j.id for j in store.cancelled_on("w3")] == [left]
    _queue_one(db, payload)
    assert store.claim("w4", (JobKind.INFERENCE,)) is not None
    assert store.requeue_interrupted() == 1
    assert store.counts()[JobState.QUEUED] == 1


def _queue_one(db: Database, payload: InferencePayload) -> int:
    with db.transaction() as conn:
        return job_store(db).enqueue(conn, JobKind.INFERENCE, "1.2.4", 1, payload)
