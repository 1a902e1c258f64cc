"""The job store as the one seam onto jobs and deliveries, and its typed payloads."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from dicom_node.database import SqliteDatabase
from dicom_node.jobs import (
    CompletionPayload,
    DeliveryState,
    InferencePayload,
    JobKind,
    JobState,
    SqliteJobStore,
    payload_from_json,
)

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


def test_the_store_keeps_payloads_and_delivery_states_typed(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    store = SqliteJobStore(db)
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
    db.close()
