"""Routing a chest CT with its prior: the prior study found on the node, handed over as the
``prior`` input, and what was found or why not recorded (issue 19 part 3)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.assembly import Assembler
from dicom_node.config import AssemblyConfig, RoutingConfig
from dicom_node.phantoms import CtPhantomSpec, Nodule, Pose, ct_series, write_ct_series
from dicom_node.route import Decision, Router
from dicom_node.store import InstanceStore, Sender
from tests.support.dicomfiles import dciodvfy
from tests.support.encoding import encoded

NOW = datetime(2025, 9, 1, 10, 0)
LUNG = "lung-nodules-ct"


def chest(patient: str, when: datetime, **changes: object) -> list[Dataset]:
    """A chest CT's headers as routing reads them (20 slices, the lung rule's minimum)."""
    spec = CtPhantomSpec(slices=20, rows=16, columns=16, patient_id=patient, acquired=when)
    datasets = list(ct_series(spec))
    for ds in datasets:
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
    return datasets


def route_all(tmp_path: Path, studies: list[list[Dataset]], **settings: object) -> list[Decision]:
    """Store the studies in this order, complete everything, and route every completion."""
    store = InstanceStore.open(tmp_path / "store", fsync=False)
    for datasets in studies:
        for ds in datasets:
            store.put(encoded(ds), ExplicitVRLittleEndian, Sender("CT", "127.0.0.1"))
    now = [time.time()]
    assembler = Assembler(store.db, AssemblyConfig(), clock=lambda: now[0])
    now[0] += 3600  # every series and study has been quiet long enough since the start
    assembler.complete_quiet()
    router = Router(
        store.data_dir,
        store.db,
        RoutingConfig(),
        installed=lambda: frozenset({LUNG}),
        algorithm_settings={LUNG: settings} if settings else None,
    )
    decisions = []
    while (decision := router.route_next()) is not None:
        decisions.append(decision)
    return decisions


def lung_routing(decisions: list[Decision], series_uid: str) -> tuple[dict[str, str], str]:
    (routed,) = [
        r for d in decisions if d.subject_uid == series_uid for r in d.routed if r.algorithm == LUNG
    ]
    return dict(routed.inputs), routed.prior


@pytest.mark.unit
def test_the_most_recent_qualifying_prior_is_the_prior_input(tmp_path: Path) -> None:
    old = chest("P1", NOW - timedelta(days=700))
    recent = chest("P1", NOW - timedelta(days=200))
    # Later than the recent prior, but no chest CT the rule takes: a scout.
    scout = chest("P1", NOW - timedelta(days=30), SeriesDescription="SCOUT")
    other_patient = chest("P2", NOW - timedelta(days=10))
    current = chest("P1", NOW)
    later = chest("P1", NOW + timedelta(days=30))  # after the current one: never its prior
    decisions = route_all(tmp_path, [old, recent, scout, other_patient, later, current])
    inputs, prior = lung_routing(decisions, current[0].SeriesInstanceUID)
    assert inputs == {"series": current[0].SeriesInstanceUID, "prior": recent[0].SeriesInstanceUID}
    assert prior == "prior: series 1 of a study 200 days earlier"
    # What the decision recorded, and its summary line, say so (with no patient data).
    (decision,) = [d for d in decisions if d.subject_uid == current[0].SeriesInstanceUID]
    assert "(prior: series 1 of a study 200 days earlier)" in decision.summary()
    # The earliest study has none; the other patient's is not P1's.
    _, first = lung_routing(decisions, old[0].SeriesInstanceUID)
    assert first == "no prior: no earlier study of the patient on the node"
    inputs, alone = lung_routing(decisions, other_patient[0].SeriesInstanceUID)
    assert "prior" not in inputs and alone.startswith("no prior")


@pytest.mark.unit
def test_a_prior_older_than_the_configured_age_is_not_taken(tmp_path: Path) -> None:
    prior = chest("P1", NOW - timedelta(days=200))
    current = chest("P1", NOW)
    decisions = route_all(tmp_path, [prior, current], prior_max_age_days=100)
    inputs, why = lung_routing(decisions, current[0].SeriesInstanceUID)
    assert inputs == {"series": current[0].SeriesInstanceUID}
    assert why == "no prior: the latest earlier study is 200 days older, more than 100"


@pytest.mark.unit
def test_issuers_and_missing_dates_are_respected(tmp_path: Path) -> None:
    prior = chest("P1", NOW - timedelta(days=50), IssuerOfPatientID="HOSPITAL-A")
    current = chest("P1", NOW, IssuerOfPatientID="HOSPITAL-B")  # another hospital's P1
    undated = chest("P1", NOW, StudyDate="")
    decisions = route_all(tmp_path, [prior, current, undated])
    inputs, why = lung_routing(decisions, current[0].SeriesInstanceUID)
    assert "prior" not in inputs and why == "no prior: no earlier study of the patient on the node"
    _, why = lung_routing(decisions, undated[0].SeriesInstanceUID)
    assert why == "no prior: the study has no StudyDate"


@pytest.mark.unit
def test_the_job_payload_carries_the_prior_as_recorded(tmp_path: Path) -> None:
    prior = chest("P1", NOW - timedelta(days=90))
    current = chest("P1", NOW)
    route_all(tmp_path, [prior, current])
    db = InstanceStore.open(tmp_path / "store", fsync=False).db
    with db.reading() as conn:
        payloads = [
            json.loads(r[0])
            for r in conn.execute("SELECT payload FROM jobs WHERE kind = 'inference' ORDER BY id")
        ]
        recorded = [
            json.loads(r[0])
            for r in conn.execute("SELECT routed FROM routing_decisions WHERE level = 'series'")
        ]
    assert payloads[-1]["inputs"] == {
        "series": current[0].SeriesInstanceUID,
        "prior": prior[0].SeriesInstanceUID,
    }
    assert "prior" not in payloads[0]["inputs"]
    notes = sorted(r["prior"] for routed in recorded for r in routed)
    assert notes == [
        "no prior: no earlier study of the patient on the node",
        "prior: series 1 of a study 90 days earlier",
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_node_follows_up_a_chest_ct_with_the_prior_it_holds(make_node, tmp_path) -> None:
    """End to end: the prior is sent (or retrieved) first, the current scan later; the
    current's SR reports each nodule against the prior."""
    pytest.importorskip("torch")
    from dicom_node.scu import send

    base = {"slices": 40, "rows": 128, "columns": 128, "pixel_spacing_mm": (0.75, 0.75)}
    base |= {"noise_hu": 20, "patient_id": "FOLLOW-UP-NODE"}
    prior = CtPhantomSpec(
        **base, nodules=(Nodule((19.0, -10.0, 14.0), 7.0),), acquired=NOW - timedelta(days=120)
    )
    current = CtPhantomSpec(
        **base,
        nodules=(Nodule((19.0, -10.0, 14.0), 9.0), Nodule((-20.0, 9.0, 30.0), 8.0)),
        pose=Pose((0.0, -15.0, 0.0), 6.0),
        acquired=NOW,
        seed=5,
    )
    node = make_node(assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1})
    assert len(send(write_ct_series(tmp_path / "prior", prior), "127.0.0.1", node.port).sent)
    node.results(1)
    assert len(send(write_ct_series(tmp_path / "current", current), "127.0.0.1", node.port).sent)
    (first, _), (second, _) = node.results(2)
    assert "followup" not in first
    followup = second["followup"]
    assert followup["prior"] == "prior" and followup["interval_days"] == pytest.approx(120)
    assert sorted(c["status"] for c in followup["changes"]) == ["increased", "new"]
    sr_paths = [
        node.data_dir / row["path"]
        for row in node.query("SELECT path FROM outputs WHERE kind = 'SR' ORDER BY job_id")
    ]
    sr = dcmread(sr_paths[-1])
    (other,) = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == dcmread(next((tmp_path / "prior").iterdir())).StudyInstanceUID
    assert dciodvfy(sr_paths[-1], from_source=("Unrecognized defined term <99DCMNODE>",)) == []
    decision = node.query(
        "SELECT summary FROM routing_decisions WHERE level = 'series' ORDER BY id DESC LIMIT 1"
    )[0][0]
    assert "(prior: series 1 of a study 120 days earlier)" in decision


@pytest.mark.unit
def test_the_worker_takes_a_prior_that_came_later_and_runs_without_one_that_went(
    tmp_path: Path,
) -> None:
    """A prior retrieved from a PACS arrives after the completion that asked for it, so it is
    not held to that completion's instances as the job's own inputs are; one that retention
    removed since routing is left out rather than failing the job."""
    from dicom_node.errors import InputError
    from dicom_node.infer import prior_input, series_input

    prior = chest("P1", NOW - timedelta(days=90))
    route_all(tmp_path, [prior])
    store = InstanceStore.open(tmp_path / "store", fsync=False)
    uid = prior[0].SeriesInstanceUID
    before_it_came = time.time() - 3600
    with pytest.raises(InputError):
        series_input(store.db, store.data_dir, uid, before_it_came)
    found = prior_input(store.db, store.data_dir, uid)
    assert found is not None and len(found.paths) == 20
    found.paths[0].unlink()
    assert prior_input(store.db, store.data_dir, uid) is None
    assert prior_input(store.db, store.data_dir, "1.2.3.4.5") is None
