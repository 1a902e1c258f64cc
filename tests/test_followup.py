"""Lung nodule follow-up: registration of a prior scan, matching of nodules, what changed, and
the TID 1500 SR that reports it (issue 19 part 3)."""

from __future__ import annotations

import math
import random
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

from dicom_node.algorithm import (
    FindingChange,
    FollowUp,
    InputSpec,
    LesionStatus,
    PriorSpec,
    SeriesInput,
)
from dicom_node.errors import ConfigError
from dicom_node.followup import (
    Lesion,
    Rigid,
    compare,
    doubling_time_days,
    interval_days,
    match,
    register_rigid,
)
from dicom_node.phantoms import CtPhantomSpec, Nodule, Pose, ct_series, write_ct_series
from tests.support.dicomfiles import dciodvfy

# Two lungs of the phantom: nodules A-C in both scans, D only in the prior, E only now.
A, B, C = (19.0, -10.0, 14.0), (21.0, 10.0, 36.0), (-19.0, -10.0, 14.0)
D, E = (-21.0, 10.0, 36.0), (-20.0, 9.0, 14.0)
PRIOR_DIAMETERS = {A: 7.0, B: 10.0, C: 8.0, D: 9.0}  # A grows, B shrinks, C is stable
CURRENT_DIAMETERS = {A: 10.0, B: 7.0, C: 8.0, E: 8.0}
BASE = {
    "slices": 40,
    "rows": 128,
    "columns": 128,
    "pixel_spacing_mm": (0.75, 0.75),
    "noise_hu": 20,
    "patient_id": "FOLLOW-UP-1",
}
PRIOR_DATE, CURRENT_DATE = datetime(2025, 3, 1, 9, 30), datetime(2025, 9, 1, 9, 30)
DAYS = (CURRENT_DATE - PRIOR_DATE).days
# Between the scans the patient lies 15 mm off (9 mm left, 12 mm anterior), turned 7 degrees.
POSE = Pose((9.0, -12.0, 0.0), 7.0)
# The SR's one expected dciodvfy warning: the private scheme of the doubling time's code.
PRIVATE_SCHEME = ("Unrecognized defined term <99DCMNODE>",)


def prior_spec() -> CtPhantomSpec:
    nodules = tuple(Nodule(c, d) for c, d in PRIOR_DIAMETERS.items())
    return CtPhantomSpec(**BASE, nodules=nodules, seed=1, acquired=PRIOR_DATE)


def current_spec(pose: Pose | None = POSE) -> CtPhantomSpec:
    nodules = tuple(Nodule(c, d) for c, d in CURRENT_DIAMETERS.items())
    return CtPhantomSpec(**BASE, nodules=nodules, seed=2, pose=pose, acquired=CURRENT_DATE)


def sphere_mm3(diameter: float) -> float:
    return math.pi * diameter**3 / 6


def series_input(folder: Path, spec: CtPhantomSpec, uid: str) -> SeriesInput:
    paths = list(write_ct_series(folder, spec))
    random.Random(0).shuffle(paths)  # the node hands files over in no particular order
    return SeriesInput(uid, tuple(paths))


@pytest.mark.unit
def test_registration_recovers_the_patients_shift_and_turn(tmp_path: Path) -> None:
    prior = series_input(tmp_path / "prior", prior_spec(), "1").volume()
    current = series_input(tmp_path / "current", current_spec(), "2").volume()
    found = register_rigid(current, prior)
    truth = POSE.matrix()
    assert abs(found.rotation_deg - POSE.rotation_deg) < 1.0, found.matrix
    # Points of the lungs land where the pose put them, within a voxel or two.
    for point in (A, B, C, D):
        assert math.dist(found.apply(point), Rigid(truth).apply(point)) < 2.0, point


@pytest.mark.unit
def test_matching_on_the_phantoms_truth_finds_growth_shrinkage_new_and_resolved() -> None:
    spec = current_spec()
    prior = [Lesion(c, d, sphere_mm3(d)) for c, d in PRIOR_DIAMETERS.items()]
    current = [Lesion(spec.posed(c), d, sphere_mm3(d)) for c, d in CURRENT_DIAMETERS.items()]
    changes = compare(current, prior, Rigid(POSE.matrix()), DAYS)
    by_finding = {c.finding: c for c in changes}
    assert [c.status for c in changes] == [
        LesionStatus.INCREASED,
        LesionStatus.DECREASED,
        LesionStatus.STABLE,
        LesionStatus.NEW,
        LesionStatus.RESOLVED,
    ]
    grown = by_finding[0]
    assert grown.prior_center_lps_mm == A and grown.distance_mm == pytest.approx(0, abs=1e-6)
    assert grown.doubling_time_days == pytest.approx(DAYS * math.log(2) / math.log((10 / 7) ** 3))
    assert grown.volume_change_percent == pytest.approx(100 * ((10 / 7) ** 3 - 1))
    assert by_finding[1].doubling_time_days is not None and by_finding[1].doubling_time_days < 0
    assert by_finding[2].doubling_time_days is None  # stable: no doubling time to speak of
    (resolved,) = [c for c in changes if c.finding is None]
    assert resolved.prior_center_lps_mm == D and resolved.prior_diameter_mm == 9.0
    # Without the registration the 15 mm move pairs them wrongly: it is what makes this right.
    unregistered = compare(current, prior, Rigid(np.eye(4)), DAYS)
    assert [c.status for c in unregistered] != [c.status for c in changes]


@pytest.mark.unit
def test_matching_takes_the_nearest_pairing_not_the_first() -> None:
    """Two nodules 12 mm apart, both moved 5 mm: each matches its own prior (Hungarian), not
    the first prior within tolerance."""
    prior = [Lesion((0.0, 0.0, 0.0), 6.0, 100.0), Lesion((12.0, 0.0, 0.0), 6.0, 100.0)]
    current = [Lesion((17.0, 0.0, 0.0), 6.0, 100.0), Lesion((5.0, 0.0, 0.0), 6.0, 100.0)]
    assert match(current, prior, Rigid(np.eye(4))) == [(0, 1, 5.0), (1, 0, 5.0)]


@pytest.mark.unit
def test_doubling_time_and_interval() -> None:
    assert doubling_time_days(100.0, 200.0, 90.0) == pytest.approx(90.0)
    assert doubling_time_days(200.0, 100.0, 90.0) == pytest.approx(-90.0)
    assert doubling_time_days(100.0, 100.0, 90.0) is None


@pytest.mark.unit
def test_interval_comes_from_the_study_dates_and_refuses_a_later_prior() -> None:
    first = next(ct_series(CtPhantomSpec(slices=1, rows=8, columns=8, acquired=PRIOR_DATE)))
    second = next(ct_series(CtPhantomSpec(slices=1, rows=8, columns=8, acquired=CURRENT_DATE)))
    assert interval_days(first, second) == pytest.approx(DAYS)
    with pytest.raises(ValueError, match="not earlier"):
        interval_days(second, first)
    del second.StudyDate
    with pytest.raises(ValueError, match="StudyDate"):
        interval_days(first, second)


@pytest.mark.unit
def test_the_prior_declaration_is_checked() -> None:
    spec = InputSpec(prior=PriorSpec())
    assert spec.mismatch(["series"]) is None and spec.mismatch(["series", "prior"]) is None
    assert "optional prior" in (spec.mismatch(["series", "other"]) or "")
    assert InputSpec().mismatch(["series", "prior"]) is not None
    with pytest.raises(ValueError, match="also a role"):
        InputSpec(roles=("prior",), prior=PriorSpec())
    with pytest.raises(ValueError, match="at least 1"):
        PriorSpec(max_age_days=0)
    with pytest.raises(ValueError, match="prior measurements"):
        FindingChange(LesionStatus.INCREASED, 0)
    with pytest.raises(ValueError, match="earlier"):
        FollowUp("prior", 0.0, ())


@pytest.mark.unit
def test_lung_algorithm_wants_a_prior_of_the_configured_age() -> None:
    pytest.importorskip("torch")
    from dicom_node_algorithms.lung_nodules_ct import LungNodulesCt

    settings = LungNodulesCt.checked_settings({"prior_max_age_days": 400})
    assert LungNodulesCt.prior_input(settings) == PriorSpec("prior", 400)
    with pytest.raises(ConfigError, match="prior_max_age_days"):
        LungNodulesCt.checked_settings({"prior_max_age_days": 0})


@pytest.fixture(scope="module")
def lung() -> object:
    pytest.importorskip("torch")
    from dicom_node_algorithms.lung_nodules_ct import LungNodulesCt

    algorithm = LungNodulesCt()
    algorithm.load("cpu")
    return algorithm


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SeriesInput]:
    folder = tmp_path_factory.mktemp("pair")
    return {
        "series": series_input(folder / "current", current_spec(), "1.2.3.2"),
        "prior": series_input(folder / "prior", prior_spec(), "1.2.3.1"),
    }


@pytest.mark.unit
@pytest.mark.slow
def test_demo_follows_up_every_phantom_nodule(lung, pair) -> None:
    """The real algorithm with its demo weights on both scans: each nodule matched to its own
    prior across the patient's move, its change and doubling time as the phantom's radii say."""
    result = lung.run(pair)
    assert result.followup is not None and result.followup.prior == "prior"
    assert result.followup.interval_days == pytest.approx(DAYS)
    spec = current_spec()
    truth_now = {spec.posed(c): c for c in CURRENT_DIAMETERS}  # where the scanner saw each
    seen = {}
    for change in result.followup.changes:
        if change.finding is None:
            assert change.status is LesionStatus.RESOLVED
            assert math.dist(change.prior_center_lps_mm, D) < 1.5
            assert change.prior_volume_mm3 == pytest.approx(sphere_mm3(9.0), rel=0.15)
            seen[D] = change
            continue
        centre = result.findings[change.finding].center_lps_mm
        posed = min(truth_now, key=lambda p: math.dist(p, centre))
        assert math.dist(posed, centre) < 1.5
        nodule = truth_now[posed]
        seen[nodule] = change
        assert change.volume_mm3 == pytest.approx(sphere_mm3(CURRENT_DIAMETERS[nodule]), rel=0.15)
        if nodule == E:
            assert change.status is LesionStatus.NEW and change.prior_center_lps_mm is None
            continue
        assert math.dist(change.prior_center_lps_mm, nodule) < 1.5  # its own prior
        before, now = PRIOR_DIAMETERS[nodule], CURRENT_DIAMETERS[nodule]
        ratio = (now / before) ** 3
        assert change.prior_volume_mm3 == pytest.approx(sphere_mm3(before), rel=0.15)
        assert change.volume_change_percent == pytest.approx(100 * (ratio - 1), abs=12)
        if ratio == 1:
            assert change.status is LesionStatus.STABLE
        else:
            assert change.status is (
                LesionStatus.INCREASED if ratio > 1 else LesionStatus.DECREASED
            )
            truth_vdt = DAYS * math.log(2) / math.log(ratio)
            assert change.doubling_time_days == pytest.approx(truth_vdt, rel=0.15)
    assert set(seen) == {A, B, C, D, E}


@pytest.mark.unit
@pytest.mark.slow
def test_follow_up_sr_references_the_prior_and_validates(lung, pair, tmp_path) -> None:
    from dicom_node.config import ResultsConfig
    from dicom_node.infer import made_by
    from dicom_node.write import Provenance, write_all

    provenance = Provenance(lung.name, lung.version, lung.weights())
    result = made_by(lung.run(pair), provenance)
    written = {w.kind: w for w in write_all(result, pair, provenance, tmp_path, ResultsConfig())}
    assert set(written) == {"SEG", "SR"}
    assert dciodvfy(written["SEG"].path) == []
    assert dciodvfy(written["SR"].path, from_source=PRIVATE_SCHEME) == []
    prior_files = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in pair["prior"].paths}
    prior_study = next(iter(prior_files.values())).StudyInstanceUID
    # The masks are drawn on the current scan only: the SEG does not name the prior.
    seg = hd.seg.segread(written["SEG"].path)
    current_series = dcmread(pair["series"].paths[0]).SeriesInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [current_series]

    sr = hd.sr.srread(written["SR"].path)
    # The prior study is the document's other evidence (PS3.3 C.17.2.3).
    (other,) = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == prior_study
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DCMNODE"
    groups = [
        g
        for g in sr.content.get_image_measurement_groups()
        if g.get_qualitative_evaluations(name=codes.DCM.QualitativeDifference)
        or g.get_qualitative_evaluations(name=codes.SCT.Nodule)
    ]
    differences = sorted(
        e.value.meaning
        for g in groups
        for e in g.get_qualitative_evaluations(name=codes.DCM.QualitativeDifference)
    )
    assert differences == sorted(
        ["Increase in size", "Decrease in size", "No significant changes in the finding",
         "New finding"]
    )  # fmt: skip
    (resolved,) = [g for g in groups if g.get_qualitative_evaluations(name=codes.SCT.Nodule)]
    assert resolved.tracking_identifier == "Resolved nodule 1"
    (diameter,) = resolved.get_measurements(name=codes.SCT.Diameter)
    assert diameter.value == pytest.approx(9.0, rel=0.3)
    # Its prior size was measured on an image of the prior study.
    for group in groups:
        for measurement in group.get_measurements(name=codes.SCT.Diameter):
            (source,) = measurement.referenced_images
            assert source.referenced_sop_instance_uid in prior_files
    vdt = [m.value for g in groups for m in g.get_measurements() if m.name.value == "VDT"]
    assert len(vdt) == 2 and min(vdt) < 0 < max(vdt)  # one grew, one shrank


@pytest.mark.unit
@pytest.mark.slow
def test_without_a_prior_the_result_is_as_before(lung, pair, tmp_path) -> None:
    from dicom_node.config import ResultsConfig
    from dicom_node.write import Provenance, write_all

    alone = {"series": pair["series"]}
    result = lung.run(alone)
    assert result.followup is None and len(result.findings) == 4
    provenance = Provenance(lung.name, lung.version, lung.weights())
    written = {w.kind: w for w in write_all(result, alone, provenance, tmp_path, ResultsConfig())}
    assert dciodvfy(written["SR"].path) == []
    sr = dcmread(written["SR"].path)
    assert "PertinentOtherEvidenceSequence" not in sr
    assert "CodingSchemeIdentificationSequence" not in sr
    assert "Qualitative Difference" not in str(sr.ContentSequence)


@pytest.mark.unit
@pytest.mark.slow
def test_a_prior_that_cannot_be_compared_leaves_the_current_read_as_it_is(
    lung, pair, caplog
) -> None:
    """A prior with a slice missing is not one regular volume: the current study is still
    read and reported, without a follow-up, and the log says why."""
    gappy = SeriesInput(
        "1.2.3.9", tuple(sorted(pair["prior"].paths))[:10] + tuple(sorted(pair["prior"].paths))[11:]
    )
    result = lung.run({"series": pair["series"], "prior": gappy})
    assert result.followup is None and len(result.findings) == 4
    assert "follow-up left out: InputError" in caplog.text


@pytest.mark.unit
def test_registration_recovers_a_move_along_the_body_too_on_a_real_chest(corpus: Path) -> None:
    """The phantom's chest is the same on every slice, so only a real one shows a move along
    the long axis: the corpus CT (30 slices of 8 mm) as the prior of itself, the patient then
    turned 6 degrees about the long axis and (8, -10, 6) mm off."""
    from scipy import ndimage

    from tests.support.paths import corpus_ct

    current = SeriesInput("1", tuple(corpus_ct(corpus))).volume()
    angle = math.radians(6.0)
    truth = np.eye(4)  # prior patient coordinates -> current ones
    truth[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    middle = (np.asarray(current.spatial_shape) - 1) / 2
    centre = (current.affine @ np.append(middle, 1.0))[:3]
    truth[:3, 3] = centre - truth[:3, :3] @ centre + [8.0, -10.0, 6.0]
    # Each prior voxel shows the body point that lies, now, where ``truth`` takes it.
    to_current = current.inverse_affine @ truth @ current.affine
    pixels = ndimage.affine_transform(
        current.array, to_current[:3, :3], to_current[:3, 3], order=1, cval=-1024.0
    )
    prior = hd.Volume(
        pixels.astype(np.float32), current.affine, "PATIENT", current.frame_of_reference_uid
    )
    found = register_rigid(current, prior)
    for offset in ([0, 0, 0], [60, 40, 20], [-60, -40, -20], [80, -30, 0]):
        point = tuple(centre + offset)
        assert math.dist(found.apply(point), Rigid(truth).apply(point)) < 1.5, offset


@pytest.mark.integration
@pytest.mark.slow
def test_offline_run_takes_the_prior_too(tmp_path: Path) -> None:
    """`dicom-node run --algorithm lung-nodules-ct --input series=NOW --input prior=THEN`."""
    import json
    import subprocess
    import sys

    write_ct_series(tmp_path / "now", current_spec())
    write_ct_series(tmp_path / "then", prior_spec())
    command = [sys.executable, "-m", "dicom_node", "run", "--algorithm", "lung-nodules-ct"]
    command += ["--input", f"series={tmp_path / 'now'}", "--input", f"prior={tmp_path / 'then'}"]
    command += ["--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "case-001" / "result.json").read_text())
    statuses = sorted(c["status"] for c in result["followup"]["changes"])
    assert statuses == ["decreased", "increased", "new", "resolved", "stable"]
    wrong = [*command[:6], "--input", f"before={tmp_path / 'then'}", "--out", str(tmp_path)]
    refused = subprocess.run(wrong, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode != 0 and "optionally --input prior=FOLDER" in refused.stderr
