"""Priority: what rules match on (station, the C-STORE request's Priority), the class a rule
gives its jobs, the claim's order (class, then age) and aging, on a real SQLite job store with
explicit times."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.audit import AuditTrail
from dicom_node.config import AuditConfig, RouteRule, SeriesMatch, load_config
from dicom_node.database import SCHEMA_VERSION, Database, SqliteDatabase, connect, database_path
from dicom_node.errors import ConfigError
from dicom_node.events import JobsRouted, RoutedJob, StudyRef
from dicom_node.facts import SeriesFacts, read_series_facts
from dicom_node.jobs import InferencePayload, JobKind, SqliteJobStore
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.priority import highest_request_priority, rank, request_priority
from dicom_node.route import decide_series, mismatch, record_decision
from dicom_node.status import build_report, format_report
from dicom_node.store import InstanceStore, Sender
from tests.support.encoding import encoded

pytestmark = pytest.mark.unit

FACTS = SeriesFacts(
    series_uid="1.2.3",
    study_uid="1.2",
    modality="CR",
    sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.1"}),
    body_part="CHEST",
    description="PA erect",
    protocol="",
    image_type=("ORIGINAL", "PRIMARY"),
    orientation=None,
    slices=1,
    pixel_spacing_mm=0.2,
    calling_aets=frozenset({"ED_CR"}),
    series_number=1,
    instances=1,
    unreadable=0,
    station_name="ED-CR-01",
    request_priority="HIGH",
)


# -- what a rule matches on ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "matching", "other", "reason"),
    [
        ("calling_aet", ["ED_CR"], ["WARD_CR"], "not an allowed calling AE"),
        ("modality", ["CR", "DX"], ["CT"], "modality CR is not CT"),
        ("body_part", ["chest"], ["HEAD"], "body part CHEST"),
        ("description", "(?i)^pa", "lateral", "series description does not match"),
        ("station_name", ["ed-cr-01"], ["CT01"], "station ED-CR-01 is not one of the rule's"),
        (
            "request_priority",
            ["HIGH"],
            ["MEDIUM", "LOW"],
            "sent with Priority HIGH, not MEDIUM/LOW",
        ),
    ],
)
def test_a_rule_matches_on_what_a_hospital_has(
    condition: str, matching: object, other: object, reason: str
) -> None:
    assert mismatch(SeriesMatch.model_validate({condition: matching}), FACTS) is None
    why = mismatch(SeriesMatch.model_validate({condition: other}), FACTS)
    assert why is not None and reason in why


def test_a_missing_station_and_an_unrecorded_priority_are_told_apart() -> None:
    unknown = replace(FACTS, station_name="", request_priority=None)
    assert mismatch(SeriesMatch(station_name=[""]), unknown) is None
    why = mismatch(SeriesMatch(request_priority=["MEDIUM"]), unknown)
    assert why == "sent with Priority (not recorded), not MEDIUM"


def test_a_rule_priority_is_one_of_three_words_and_routine_by_default() -> None:
    rule = RouteRule(algorithm="pneumonia-cxr", series=SeriesMatch())
    assert rule.priority == "routine"
    with pytest.raises(ConfigError, match=r"routing\.rules\.0\.priority"):
        load_config(
            environ={"DICOM_NODE__ROUTING__RULES": "[{algorithm: a, series: {}, priority: asap}]"}
        )
    with pytest.raises(ConfigError, match=r"request_priority\.0"):
        load_config(
            environ={
                "DICOM_NODE__ROUTING__RULES": "[{algorithm: a, series: {request_priority: [STAT]}}]"
            }
        )
    with pytest.raises(ConfigError, match=r"worker\.priority_aging_s"):
        load_config(environ={"DICOM_NODE__WORKER__PRIORITY_AGING_S": "0"})


def test_the_request_priority_codes_are_ps3_7s() -> None:
    # PS3.7 9.1.1.1: LOW = 0002H, MEDIUM = 0000H, HIGH = 0001H.
    assert [request_priority(code) for code in (0x0000, 0x0001, 0x0002)] == [
        "MEDIUM",
        "HIGH",
        "LOW",
    ]
    assert request_priority(None) == "MEDIUM"
    with pytest.raises(ValueError, match="0x0003"):
        request_priority(3)
    assert highest_request_priority(["LOW", "HIGH", "MEDIUM"]) == "HIGH"
    assert highest_request_priority(["LOW", None]) == "LOW"
    assert highest_request_priority([None]) is None


# -- the request's Priority and the station, stored and read back ----------------------------------


def test_the_request_priority_is_kept_with_each_instance_and_read_as_the_series_highest(
    tmp_path: Path,
) -> None:
    store = InstanceStore.open(tmp_path, fsync=False)
    series_uid = generate_uid()
    for priority in ("LOW", "HIGH"):
        ds = cxr_dataset(CxrPhantomSpec(rows=64, columns=64))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.StationName = "ED-CR-01"
        store.put(
            encoded(ds),
            ExplicitVRLittleEndian,
            Sender("ED_CR", "127.0.0.1"),
            request_priority=priority,
        )
    facts = read_series_facts(tmp_path, store.db, series_uid)
    assert facts.request_priority == "HIGH"
    assert facts.station_name == "ED-CR-01"
    store.close()


def test_an_older_database_gets_the_priority_columns(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    old = sqlite3.connect(path)
    # The jobs and instances tables as schema 2 made them.
    old.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
        " subject_uid TEXT NOT NULL, generation INTEGER NOT NULL, payload TEXT NOT NULL,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, error TEXT,"
        " created_at REAL NOT NULL, started_at REAL, finished_at REAL);"
        "INSERT INTO jobs (kind, subject_uid, generation, payload, state, created_at)"
        " VALUES ('series-complete', '1.2', 1, '{}', 'succeeded', 1.0);"
        "CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL,"
        " study_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL,"
        " path TEXT NOT NULL, size INTEGER NOT NULL, calling_aet TEXT NOT NULL,"
        " peer_host TEXT NOT NULL, received_at REAL NOT NULL);"
        "PRAGMA user_version = 2;"
    )
    old.close()
    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT priority FROM jobs").fetchone()[0] == "routine"
    columns = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
    assert "request_priority" in columns
    conn.close()


# -- the class a rule gives its jobs ---------------------------------------------------------------


def test_a_routed_series_queues_its_job_with_the_rule_priority(tmp_path: Path) -> None:
    rules = [
        RouteRule(algorithm="pneumonia-cxr", series=SeriesMatch(modality=["CR"]), priority="stat"),
        RouteRule(algorithm="example-threshold", series=SeriesMatch(modality=["CR"])),
    ]
    decision = decide_series(FACTS, rules, frozenset({"pneumonia-cxr", "example-threshold"}), 1)
    assert [(r.algorithm, r.priority) for r in decision.routed] == [
        ("pneumonia-cxr", "stat"),
        ("example-threshold", "routine"),
    ]
    assert "routed to pneumonia-cxr as stat" in decision.summary()
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    store = SqliteJobStore(db)
    with db.transaction() as conn:
        ids = record_decision(conn, store, decision)
    jobs = [store.get(job_id) for job_id in ids]
    assert [(j.inference.algorithm, j.priority) for j in jobs if j] == [
        ("pneumonia-cxr", "stat"),
        ("example-threshold", "routine"),
    ]
    db.close()


# -- the claim's order -----------------------------------------------------------------------------


class Clock:
    """Explicit times for the store: what enqueue stamps and what a claim calls now."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def queue(db: Database, store: SqliteJobStore, clock: Clock, jobs: list[tuple[str, float]]) -> dict:
    """Queue one inference job per (priority, created at); their IDs by name ("stat@5")."""
    ids = {}
    for priority, at in jobs:
        clock.now = at
        with db.transaction() as conn:
            ids[f"{priority}@{at:g}"] = store.enqueue(
                conn,
                JobKind.INFERENCE,
                generate_uid(),
                1,
                InferencePayload("example-threshold", {"series": "1.2"}, "series"),
                priority,
            )
    return ids


def claimed(store: SqliteJobStore, clock: Clock, at: float) -> list[int]:
    """Claim every queued job at time ``at``, in the order the store gives them."""
    clock.now = at
    order = []
    while (job := store.claim("w", (JobKind.INFERENCE,))) is not None:
        assert job.started_at == at
        order.append(job.id)
    return order


@pytest.fixture
def timed_store(tmp_path: Path):
    clock = Clock()
    db = SqliteDatabase(tmp_path / "index.sqlite3")
    yield db, SqliteJobStore(db, aging_s=600, clock=clock), clock
    db.close()


def test_jobs_are_claimed_stat_then_urgent_then_routine_then_oldest(timed_store) -> None:
    db, store, clock = timed_store
    ids = queue(
        db,
        store,
        clock,
        [
            ("routine", 10),
            ("urgent", 20),
            ("routine", 5),
            ("stat", 30),
            ("urgent", 15),
            ("stat", 40),
        ],
    )
    # All claimed within one aging period of the oldest: no job has aged yet.
    assert claimed(store, clock, 100) == [
        ids[name]
        for name in ("stat@30", "stat@40", "urgent@15", "urgent@20", "routine@5", "routine@10")
    ]


def test_a_routine_job_older_than_the_aging_time_beats_a_fresh_urgent_one(timed_store) -> None:
    db, store, clock = timed_store
    ids = queue(db, store, clock, [("routine", 0), ("urgent", 650)])
    # At 700 s the routine job waited 700 s (one period): it counts as urgent, and is older.
    assert claimed(store, clock, 700) == [ids["routine@0"], ids["urgent@650"]]


def test_a_routine_job_not_yet_aged_waits_for_a_fresh_urgent_one(timed_store) -> None:
    db, store, clock = timed_store
    ids = queue(db, store, clock, [("routine", 0), ("urgent", 500)])
    assert claimed(store, clock, 599) == [ids["urgent@500"], ids["routine@0"]]


def test_two_aging_periods_make_a_routine_job_count_as_stat(timed_store) -> None:
    """Under a stream of stat jobs a routine job rises to stat and then goes first as the
    oldest: it never starves."""
    db, store, clock = timed_store
    ids = queue(db, store, clock, [("routine", 0), ("stat", 1100), ("stat", 1150)])
    assert claimed(store, clock, 1199) == [ids["stat@1100"], ids["stat@1150"], ids["routine@0"]]
    ids = queue(db, store, clock, [("routine", 2000), ("stat", 3100), ("stat", 3150)])
    assert claimed(store, clock, 3200) == [ids["routine@2000"], ids["stat@3100"], ids["stat@3150"]]


def test_the_aging_time_is_checked() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="aging"):
            SqliteJobStore(SqliteDatabase.__new__(SqliteDatabase), aging_s=bad)
    assert rank("stat") < rank("urgent") < rank("routine")
    with pytest.raises(ValueError, match="asap"):
        rank("asap")


# -- the audit trail -------------------------------------------------------------------------------


def test_the_audit_trail_records_each_routed_job_with_its_priority(tmp_path: Path) -> None:
    trail = AuditTrail(AuditConfig(), tmp_path, "DICOMNODE")
    (message,) = trail.messages(
        JobsRouted(
            "series",
            (StudyRef("1.2.3", "PAT-1", 1),),
            (RoutedJob(7, "pneumonia-cxr", "stat"),),
        )
    )
    trail.close()
    identification = message["EventIdentification"]
    assert identification["EventID"]["csd-code"] == "110103"  # DICOM Instances Accessed
    assert identification["EventActionCode"] == "R"
    assert identification["EventOutcomeDescription"] == (
        "series routed: pneumonia-cxr as job 7, priority stat"
    )
    assert {o["ParticipantObjectID"] for o in message["ParticipantObjectIdentification"]} == {
        "1.2.3",
        "PAT-1",
    }


def test_status_counts_queued_inference_jobs_by_class(tmp_path: Path) -> None:
    db = SqliteDatabase(database_path(tmp_path))
    clock = Clock()
    queue(db, SqliteJobStore(db, clock=clock), clock, [("stat", 1), ("routine", 2), ("routine", 3)])
    db.close()
    report = build_report(load_config(environ={"DICOM_NODE__STORE__DATA_DIR": str(tmp_path)}))
    assert report.queued_by_priority == {"stat": 1, "urgent": 0, "routine": 2}
    assert "queued inference by priority: stat 1, urgent 0, routine 2" in format_report(report)
