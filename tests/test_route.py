"""Routing decisions for every series of the real corpus and for phantoms, negative cases too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.config import RoutingConfig, load_config
from dicom_node.errors import ConfigError
from dicom_node.facts import describe_series, plane_of, read_series_facts, study_series
from dicom_node.jobs import SqliteJobStore
from dicom_node.phantoms import (
    CtPhantomSpec,
    CxrPhantomSpec,
    ct_series,
    cxr_dataset,
)
from dicom_node.route import decide_series, decide_study, record_decision
from dicom_node.store import InstanceStore, Sender
from tests.support.cases import decoy_study, mr_series
from tests.support.dicomfiles import corpus_instances, dataset_bytes
from tests.support.encoding import encoded

ALL = frozenset({"lung-nodules-ct", "brain-tumour-mr", "pneumonia-cxr"})
RULES = RoutingConfig().rules


@pytest.fixture(scope="module")
def corpus_store(corpus: Path, tmp_path_factory) -> InstanceStore:
    """The whole corpus in a store, as the SCP would have stored it."""
    store = InstanceStore.open(tmp_path_factory.mktemp("corpus-store"), fsync=False)
    for paths in corpus_instances(corpus).values():
        syntax, data = dataset_bytes(paths[-1])
        store.put(data, syntax, Sender("PACS", "127.0.0.1"))
    yield store
    store.close()


def corpus_decisions(store: InstanceStore) -> dict[str, tuple]:
    """Series description (or SOP class) -> (facts, decision) for every stored series."""
    with store.db.reading() as conn:
        uids = [r[0] for r in conn.execute("SELECT series_uid FROM series")]
    result = {}
    for uid in uids:
        facts = read_series_facts(store.data_dir, store.db, uid)
        result[uid] = (facts, decide_series(facts, RULES, ALL, 1))
    return result


def routed_to(decision) -> set[str]:
    return {r.algorithm for r in decision.routed}


@pytest.mark.unit
def test_every_corpus_series_gets_a_decision(corpus_store) -> None:
    decisions = corpus_decisions(corpus_store)
    assert len(decisions) >= 40
    for facts, decision in decisions.values():
        assert decision.routed or decision.not_routed, facts.description
        # Derived and non-image objects never reach a model.
        if facts.modality in {
            "SEG",
            "SR",
            "RWV",
            "ANN",
            "SM",
        } or "1.2.840.10008.5.1.4.1.1.66.4" in (facts.sop_class_uids):
            assert not decision.routed, facts
            assert decision.not_routed[0].algorithm == "*"


@pytest.mark.unit
def test_corpus_routes_what_a_radiologist_expects(corpus_store) -> None:
    by_description: dict[str, list] = {}
    for facts, decision in corpus_decisions(corpus_store).values():
        by_description.setdefault(facts.description, []).append((facts, decision))
    # The two real chest CT series (30 axial slices each, B70f and B40f kernels).
    chest = [d for desc, items in by_description.items() if "ThoraxRoutine" in desc for d in items]
    assert len(chest) == 2 and all(routed_to(d) == {"lung-nodules-ct"} for _, d in chest)
    # The RSNA radiograph: Modality CR in a Secondary Capture without position or orientation.
    ((cxr_facts, cxr),) = by_description["view: PA"]
    assert cxr_facts.orientation is None and routed_to(cxr) == {"pneumonia-cxr"}
    # highdicom's DX chest radiograph (BodyPartExamined THORAX).
    ((_, dx),) = by_description["CHEST"]
    assert routed_to(dx) == {"pneumonia-cxr"}
    # One sagittal MPRAGE: a T1 candidate, never routed on its own.
    ((mr_facts, mr),) = by_description["SAG MPRAGE 220 FOV"]
    assert mr_facts.orientation == "sagittal" and mr_facts.slices == 192
    assert not mr.routed
    (brain,) = [n for n in mr.not_routed if n.algorithm == "brain-tumour-mr"]
    assert "can be T1" in brain.reason
    # A 3-slice CT is too short for nodule detection, with the reason said.
    (ct3,) = [
        d
        for desc, items in by_description.items()
        if desc == "Image 23x38x3"
        for f, d in items
        if f.slices == 3
    ]
    assert any("3 slices, fewer than 20" in n.reason for n in ct3.not_routed)
    # Ultrasound matches no rule.
    us = [d for items in by_description.values() for f, d in items if f.modality == "US"]
    assert us and all(not d.routed for d in us)


@pytest.mark.unit
def test_corpus_brain_study_lacks_roles(corpus_store) -> None:
    with corpus_store.db.reading() as conn:
        (study_uid,) = conn.execute(
            "SELECT study_uid FROM series WHERE description = 'SAG MPRAGE 220 FOV'"
        ).fetchone()
    series = [
        read_series_facts(corpus_store.data_dir, corpus_store.db, uid)
        for uid in study_series(corpus_store.db, study_uid)
    ]
    decision = decide_study(study_uid, series, RULES, ALL, 1)
    assert not decision.routed
    assert [n.reason for n in decision.not_routed] == ["missing role(s) T1c, T2, FLAIR"]


def store_study(tmp_path: Path, series: list[list[Dataset]]) -> InstanceStore:
    store = InstanceStore.open(tmp_path / "store", fsync=False)
    for datasets in series:
        for ds in datasets:
            store.put(encoded(ds), ExplicitVRLittleEndian, Sender("MRI", "127.0.0.1"))
    return store


def study_decision(store: InstanceStore, study_uid: str):
    series = [
        read_series_facts(store.data_dir, store.db, uid)
        for uid in study_series(store.db, study_uid)
    ]
    return decide_study(study_uid, series, RULES, ALL, 1), series


@pytest.mark.unit
def test_four_sequence_mr_study_routes_by_role(tmp_path: Path) -> None:
    study = generate_uid()
    names = {
        "T1c": "AX T1 MPRAGE POST GD",
        "T1": "AX T1 SE",
        "T2": "AX T2 TSE",
        "FLAIR": "AX T2 FLAIR",
        "localizer": "3-plane loc",
    }
    series = [mr_series(study, desc, n) for n, desc in enumerate(names.values(), 1)]
    store = store_study(tmp_path, series)
    decision, _ = study_decision(store, study)
    (routed,) = decision.routed
    assert routed.algorithm == "brain-tumour-mr"
    uid_of = {desc: s[0].SeriesInstanceUID for desc, s in zip(names.values(), series, strict=True)}
    assert routed.inputs == {role: uid_of[names[role]] for role in ("T1c", "T1", "T2", "FLAIR")}


@pytest.mark.unit
def test_mr_study_missing_a_role_is_not_routed(tmp_path: Path) -> None:
    study = generate_uid()
    series = [mr_series(study, d, n) for n, d in enumerate(["T1 post gd", "T1", "T2"], 1)]
    store = store_study(tmp_path, series)
    decision, _ = study_decision(store, study)
    assert not decision.routed
    assert decision.not_routed[0].reason == "missing role(s) FLAIR"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "excluded by the rule"),
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "orientation coronal"),
        ({"SeriesDescription": "PhoenixZIPReport"}, "scanner report"),
        ({"Modality": "SEG"}, "derived or non-image"),
        ({"BodyPartExamined": "HEAD"}, "body part HEAD"),
    ],
)
def test_ct_negative_cases(tmp_path: Path, changes: dict, reason: str) -> None:
    datasets = list(ct_series(CtPhantomSpec(slices=24, rows=8, columns=8)))
    for ds in datasets:
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
    store = store_study(tmp_path, [datasets])
    facts = read_series_facts(store.data_dir, store.db, datasets[0].SeriesInstanceUID)
    decision = decide_series(facts, RULES, ALL, 1)
    assert not decision.routed
    assert any(reason in n.reason for n in decision.not_routed), decision.summary()


@pytest.mark.unit
def test_phantom_ct_routes_unless_not_installed(tmp_path: Path) -> None:
    datasets = list(ct_series(CtPhantomSpec(slices=24, rows=8, columns=8)))
    store = store_study(tmp_path, [datasets])
    facts = read_series_facts(store.data_dir, store.db, datasets[0].SeriesInstanceUID)
    assert facts.orientation == "axial" and facts.slices == 24
    assert routed_to(decide_series(facts, RULES, ALL, 1)) == {"lung-nodules-ct"}
    missing = decide_series(facts, RULES, frozenset(), 1)
    assert not missing.routed
    assert "lung-nodules-ct: matches, but the algorithm is not installed" in missing.summary()


@pytest.mark.unit
def test_a_decision_is_recorded_once_with_its_jobs(tmp_path: Path) -> None:
    datasets = list(ct_series(CtPhantomSpec(slices=24, rows=8, columns=8)))
    store = store_study(tmp_path, [datasets])
    facts = read_series_facts(store.data_dir, store.db, datasets[0].SeriesInstanceUID)
    decision = decide_series(facts, RULES, ALL, 1)
    with store.db.transaction() as conn:
        (job_id,) = record_decision(conn, SqliteJobStore(store.db), decision)
    with store.db.transaction() as conn:
        assert record_decision(conn, SqliteJobStore(store.db), decision) == []  # a replayed job
    with store.db.reading() as conn:
        job = conn.execute("SELECT kind, payload FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert conn.execute("SELECT COUNT(*) FROM routing_decisions").fetchone()[0] == 1
    assert job["kind"] == "inference"
    assert json.loads(job["payload"])["inputs"] == {"series": facts.series_uid}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("orientation", "plane"),
    [
        ([1, 0, 0, 0, 1, 0], "axial"),
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "oblique"),
        ([1, 0, 0, 1, 0, 0], None),
        (None, None),
    ],
)
def test_plane_of(orientation, plane) -> None:
    assert plane_of(orientation) == plane


@pytest.mark.unit
@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (
            {"rules": [{"algorithm": "x", "series": {"description": "(unclosed"}}]},
            "routing.rules.0.series.description",
        ),
        ({"rules": [{"algorithm": "x"}]}, "exactly one of 'series' or 'roles'"),
        (
            {"rules": [{"algorithm": "x", "series": {"orientation": ["diagonal"]}}]},
            "routing.rules.0.series.orientation.0",
        ),
    ],
)
def test_bad_routing_rules_name_the_key(tmp_path: Path, routing, message) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps({"routing": routing}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(path, {})


@pytest.mark.integration
def test_node_records_decisions_and_status_shows_them(make_node, corpus: Path) -> None:
    from dicom_node.scu import send

    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        worker={"enabled": False},  # decisions only: the jobs stay queued
    )
    folder = corpus / "chest-ct-lung-pet-ct-dx"
    report = send([folder], "127.0.0.1", node.port)
    assert len(report.sent) == 60
    assert node.wait_for("SELECT COUNT(*) FROM routing_decisions WHERE level = 'series'", 2) == 2
    summaries = [r[0] for r in node.query("SELECT summary FROM routing_decisions")]
    series = [s for s in summaries if s.startswith("routed to lung-nodules-ct;")]
    assert len(series) == 2, summaries
    assert "pneumonia-cxr: modality CT is not CR/DX" in series[0]
    queued = "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND state = 'queued'"
    assert node.query(queued)[0][0] == 2
    status = node.status()
    assert "routing: " in status and "lung-nodules-ct" in status


# -- brain MR roles from acquisition attributes, with the decoys of a real study ----------------


@pytest.mark.unit
def test_brain_roles_come_from_acquisition_attributes_not_names(tmp_path: Path) -> None:
    uids = decoy_study(tmp_path / "study")
    store = store_study(
        tmp_path,
        [[dcmread(p) for p in sorted(d.glob("*.dcm"))] for d in (tmp_path / "study").iterdir()],
    )
    study_uid = dcmread(next((tmp_path / "study").rglob("*.dcm"))).StudyInstanceUID
    decision, _ = study_decision(store, study_uid)
    (routed,) = decision.routed
    assert routed.inputs == {
        "T1c": uids["T1W_3D_TFE +C"],
        "T1": uids["T1W_SE"],
        "T2": uids["sT2/TSE/T"],
        "FLAIR": uids["T2W_FLAIR"],
    }
    why = {c.description: c for c in routed.candidates}
    assert len(why) == 8 and all(c.reason for c in why.values())
    assert why["sT2/TSE/T"].role == "T2" and "TE 100" in why["sT2/TSE/T"].reason
    assert "echo-planar" in why["T2W/FE-EPI"].reason and why["T2W/FE-EPI"].role is None
    assert "never a role: a mask" in why["FLAIR_ROI"].reason
    assert "diffusion" in why["Ax DWI 1000b"].reason
    assert "localizer" in why["3-Plane Loc"].reason
    # Series numbers only in the line that is logged and shown.
    assert "T2: series 3" in decision.summary() and "FLAIR_ROI" not in decision.summary()
    # The reasons are recorded with the decision, where the API reads them.
    with store.db.transaction() as conn:
        record_decision(conn, SqliteJobStore(store.db), decision)
    with store.db.reading() as conn:
        (recorded,) = json.loads(conn.execute("SELECT routed FROM routing_decisions").fetchone()[0])
    assert {c["description"]: c["reason"] for c in recorded["candidates"]} == {
        d: c.reason for d, c in why.items()
    }


@pytest.mark.unit
def test_description_rules_still_work_in_yaml(tmp_path: Path) -> None:
    """A user's own rule on descriptions overrides the physics, and still never takes a mask."""
    path = tmp_path / "node.yaml"
    roles = {
        role: {"modality": ["MR"], "description": pattern}
        for role, pattern in {"T1c": r"\+C", "T1": "T1W_SE", "T2": "T2", "FLAIR": "FLAIR"}.items()
    }
    path.write_text(
        json.dumps({"routing": {"rules": [{"algorithm": "brain-tumour-mr", "roles": roles}]}})
    )
    rules = load_config(path, {}).routing.rules
    uids = decoy_study(tmp_path / "study")
    store = store_study(
        tmp_path,
        [[dcmread(p) for p in sorted(d.glob("*.dcm"))] for d in (tmp_path / "study").iterdir()],
    )
    study_uid = dcmread(next((tmp_path / "study").rglob("*.dcm"))).StudyInstanceUID
    series = [
        read_series_facts(store.data_dir, store.db, u) for u in study_series(store.db, study_uid)
    ]
    (routed,) = decide_study(study_uid, series, rules, ALL, 1).routed
    assert routed.inputs["FLAIR"] == uids["T2W_FLAIR"]  # FLAIR_ROI matches "FLAIR" but is a mask
    # "T2" matches sT2/TSE/T, T2W/FE-EPI and T2W_FLAIR; the physics prefers the spin echo.
    assert routed.inputs["T2"] == uids["sT2/TSE/T"]


@pytest.mark.unit
def test_a_radiograph_without_pixel_data_is_not_routed(tmp_path: Path) -> None:
    """Rows and Columns without Pixel Data (a CR header a PACS sent alone) is no image."""
    ds = cxr_dataset(CxrPhantomSpec(rows=16, columns=16))
    del ds.PixelData
    store = store_study(tmp_path, [[ds]])
    facts = read_series_facts(store.data_dir, store.db, ds.SeriesInstanceUID)
    assert facts.slices == 0
    decision = decide_series(facts, RULES, ALL, 1)
    assert not decision.routed
    assert decision.not_routed[0].reason == "no pixel data"


@pytest.mark.unit
@pytest.mark.parametrize("keyword", ["FloatPixelData", "DoubleFloatPixelData"])
def test_float_pixel_data_counts_as_pixels(tmp_path: Path, keyword: str) -> None:
    ds = cxr_dataset(CxrPhantomSpec(rows=4, columns=4))
    del ds.PixelData
    setattr(
        ds,
        keyword,
        np.zeros(16, np.float32 if keyword == "FloatPixelData" else np.float64).tobytes(),
    )
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert describe_series([path]).slices == 1
