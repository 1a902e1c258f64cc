"""The JSON API's readers on an index built in-process: same answers, few statements."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node import api
from dicom_node.assembly import Assembler
from dicom_node.config import AssemblyConfig
from dicom_node.database import connect, database_path
from dicom_node.jobs import InferencePayload, SqliteJobStore
from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.route import Decision, Routed, record_decision
from dicom_node.store import InstanceStore, Sender

pytestmark = pytest.mark.unit


def encoded(ds) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def receive(store: InstanceStore, study_uid: str, sender: str, slices: int = 1) -> str:
    """Store a small CT series of a study in one association from ``sender``, released: the
    series and the study complete (their completion jobs queued). The series UID."""
    series = ct_series(CtPhantomSpec(slices=slices, rows=16, columns=16, study_uid=study_uid))
    return send(store, list(series), sender)


def send(store: InstanceStore, datasets: list, sender: str) -> str:
    assembler = Assembler(store.db, AssemblyConfig())
    assembler.association_opened(1)
    for ds in datasets:
        stored = store.put(encoded(ds), ExplicitVRLittleEndian, Sender(sender, "127.0.0.1"))
        assembler.instance_stored(1, stored)
    assert assembler.association_ended(1, released=True)
    return stored.header.series_uid


def route(
    store: InstanceStore, level: str, subject: str, algorithms: list[str], generation: int = 1
) -> list[int]:
    """Route a completed subject to algorithms; the inference jobs, each with deliveries."""
    routed = [
        Routed(algorithm, {"series": subject}, ("pacs", "sender"), ("MODALITY", "CT2"))
        for algorithm in algorithms
    ]
    jobs = SqliteJobStore(store.db)
    to = InferencePayload("a", {}, level, ("pacs", "sender"), ("MODALITY",))
    with store.db.transaction() as conn:
        ids = record_decision(conn, jobs, Decision(level, subject, generation, routed))
        for job_id in ids:
            jobs.schedule_deliveries(conn, job_id, to)
    return ids


def old_studies(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The oracle: ``api.studies`` as it was, one job query per listed study."""
    rows = conn.execute(
        "SELECT st.study_uid, st.first_received, st.last_received, st.completed_at,"
        " st.completions,"
        " (SELECT COUNT(*) FROM series s WHERE s.study_uid = st.study_uid) AS series,"
        " (SELECT COUNT(*) FROM instances i WHERE i.study_uid = st.study_uid) AS instances,"
        " (SELECT GROUP_CONCAT(DISTINCT i.calling_aet) FROM instances i"
        "   WHERE i.study_uid = st.study_uid) AS senders,"
        " (SELECT GROUP_CONCAT(DISTINCT s.modality) FROM series s"
        "   WHERE s.study_uid = st.study_uid) AS modalities"
        " FROM studies st ORDER BY st.last_received DESC LIMIT ?",
        (limit,),
    ).fetchall()
    out = []
    for row in rows:
        jobs = api._jobs(conn, study_uid=row[0])
        out.append(
            {
                **dict(row),
                "senders": (row["senders"] or "").split(","),
                "modalities": sorted(filter(None, (row["modalities"] or "").split(","))),
                "jobs": {
                    state: sum(j["state"] == state for j in jobs)
                    for state in ("queued", "running", "succeeded", "failed", "cancelled")
                },
                "deliveries": {
                    state: sum(d["state"] == state for j in jobs for d in j["deliveries"])
                    for state in ("pending", "sent", "dead")
                },
            }
        )
    return out


@pytest.fixture
def store(tmp_path: Path):
    s = InstanceStore.open(tmp_path / "data", fsync=False)
    yield s
    s.close()


def reader(store: InstanceStore) -> sqlite3.Connection:
    return connect(database_path(store.data_dir), readonly=True)


def statements(conn: sqlite3.Connection, read) -> int:
    """How many SQL statements ``read(conn)`` runs."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        read(conn)
    finally:
        conn.set_trace_callback(None)
    return len(seen)


def test_studies_answer_as_the_per_study_queries_did(store):
    studies = [generate_uid() for _ in range(6)]
    # Study 0: three series from two senders, interleaved; series- and study-level jobs.
    first = receive(store, studies[0], "MODALITY", slices=2)
    second = receive(store, studies[0], "CT2")
    receive(store, studies[0], "MODALITY")
    route(store, "series", first, ["a", "b"])
    route(store, "series", second, ["c"])
    route(store, "study", studies[0], ["d"])
    # Study 1: one series, one job; study 2: received, never routed; study 3: routed, nothing.
    route(store, "series", receive(store, studies[1], "MODALITY"), ["a"])
    receive(store, studies[2], "AE,WITH,COMMAS")  # the old list split it at its commas
    receive(store, studies[3], "MODALITY")
    route(store, "study", studies[3], [])
    # Study 4: a job whose subject is a series UID the index does not hold maps to itself.
    receive(store, studies[4], "MODALITY")
    route(store, "series", "1.2.3.999", ["a"])
    route(store, "study", studies[4], ["a", "b"])
    # Study 5: its only instance sent again under study 1: no instances left, no senders.
    (moved,) = ct_series(CtPhantomSpec(slices=1, rows=16, columns=16, study_uid=studies[5]))
    send(store, [moved], "MODALITY")
    moved.StudyInstanceUID = studies[1]
    moved.SeriesInstanceUID = generate_uid()
    send(store, [moved], "CT2")

    jobs = SqliteJobStore(store.db)
    running = jobs.claim("w", ("inference",))
    done = jobs.claim("w", ("inference",))
    jobs.succeed(done.id)
    failed = jobs.claim("w", ("inference",))
    jobs.fail(failed.id, "broken", worker="w", max_attempts=1)
    jobs.claim("w", ("inference",))  # a study-0 job runs too
    last = jobs.claim("w", ("inference",))
    jobs.succeed(last.id)
    # Deliveries: the succeeded jobs' go out or die (no public helper moves them in a test).
    with store.db.transaction() as conn:
        conn.execute(
            "UPDATE deliveries SET state = 'sent', sent_at = 1 WHERE job_id = ?", (done.id,)
        )
        conn.execute(
            "UPDATE deliveries SET state = 'dead', last_error = 'x' WHERE job_id = ?"
            " AND destination = 'pacs'",
            (last.id,),
        )
    assert running is not None and failed is not None

    conn = reader(store)
    try:
        for limit in (50, 4, 1):
            # Compared as JSON text: the same keys in the same order, the same values.
            assert json.dumps(api.studies(conn, limit)) == json.dumps(old_studies(conn, limit))
        got = api.studies(conn)
        # The index holds what the fixture meant to build.
        assert [s["study_uid"] for s in got] == [studies[i] for i in (1, 5, 4, 3, 2, 0)]
        by_uid = {s["study_uid"]: s for s in got}
        assert by_uid[studies[0]]["jobs"] == {
            "queued": 0,
            "running": 2,
            "succeeded": 1,
            "failed": 1,
            "cancelled": 0,
        }
        assert by_uid[studies[0]]["deliveries"] == {"pending": 6, "sent": 2, "dead": 0}
        assert by_uid[studies[0]]["senders"] == ["MODALITY", "CT2"]
        assert by_uid[studies[0]]["series"] == 3 and by_uid[studies[0]]["instances"] == 4
        assert by_uid[studies[1]]["senders"] == ["MODALITY", "CT2"]
        assert by_uid[studies[1]]["deliveries"] == {"pending": 1, "sent": 0, "dead": 1}
        assert by_uid[studies[2]]["senders"] == ["AE", "WITH", "COMMAS"]
        assert by_uid[studies[2]]["jobs"] == dict.fromkeys(by_uid[studies[2]]["jobs"], 0)
        assert by_uid[studies[4]]["jobs"]["queued"] == 2  # not the unknown series' job
        assert by_uid[studies[5]]["instances"] == 0 and by_uid[studies[5]]["senders"] == [""]
    finally:
        conn.close()


def test_studies_runs_as_many_statements_for_one_study_as_for_fifty(store):
    counts = {}
    for wanted in (1, 50):
        while len(api.studies(conn := reader(store), 1000)) < wanted:
            conn.close()
            uid = generate_uid()
            route(store, "series", receive(store, uid, "MODALITY"), ["a", "b"])
            route(store, "study", uid, ["c"])
        conn.close()
        conn = reader(store)
        try:
            assert len(api.studies(conn)) == wanted
            counts[wanted] = statements(conn, api.studies)
            assert api.studies(conn) == old_studies(conn)
            old = statements(conn, old_studies)
        finally:
            conn.close()
        print(f"{wanted} studies: {counts[wanted]} statements (before: {old})")
    assert counts[1] == counts[50] == 4


def test_a_job_is_listed_once_when_its_study_and_series_share_a_uid(store):
    """Some modalities give a series its study's UID: the series' and the study's completion
    jobs then share a subject UID, and each inference job was joined to both."""
    uid = generate_uid()
    spec = CtPhantomSpec(slices=2, rows=16, columns=16, study_uid=uid, series_uid=uid)
    send(store, list(ct_series(spec)), "MODALITY")
    ids = route(store, "series", uid, ["a"]) + route(store, "study", uid, ["b"])
    conn = reader(store)
    try:
        assert sorted(j["id"] for j in api.jobs(conn)) == sorted(ids)
        assert api.studies(conn)[0]["jobs"]["queued"] == 2
    finally:
        conn.close()


def test_timelines_are_of_the_job_s_own_subject_and_completion(store):
    """A job's "received" step is the instances of its own series (or study) that its
    completion took in: not a series of the study received after it, and not the copies of
    a resend, which reopen the series for a job of their own. No step takes negative time."""
    study = generate_uid()
    spec = CtPhantomSpec(slices=3, rows=16, columns=16, study_uid=study)
    first = list(ct_series(spec))
    series = send(store, first, "MODALITY")
    (before,) = route(store, "series", series, ["a"])
    receive(store, study, "MODALITY")  # another series of the study, later
    for ds in first:  # a corrected resend: the latest copy wins and the series reopens
        ds.SeriesDescription = "CORRECTED"
    send(store, first, "MODALITY")
    (after,) = route(store, "series", series, ["a"], generation=2)
    conn = reader(store)
    try:
        completions = dict(
            conn.execute(
                "SELECT generation, created_at FROM jobs WHERE kind = 'series-complete'"
                " AND subject_uid = ?",
                (series,),
            ).fetchall()
        )
        timelines = {j["id"]: {s["step"]: s for s in j["timeline"]} for j in api.jobs(conn)}
    finally:
        conn.close()
    assert sorted(completions) == [1, 2]
    for job_id in (before, after):
        negative = [s for s in timelines[job_id].values() if (s["took_s"] or 0) < 0]
        assert not negative, negative
    # The first job's instances were all replaced: when they first came is not known.
    assert timelines[before]["received"]["at"] is None
    assert timelines[before]["complete"]["at"] == completions[1]
    received = timelines[after]["received"]["at"]
    assert completions[1] < received <= completions[2]
