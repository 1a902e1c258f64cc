"""qa's checks on what came back for each phantom study: that the results arrived, that they
belong to the study and patient sent, that the Segmentation's frames derive from the images
sent and lie on the phantom's truth, that the TID 1500 report's measurements reference the
right images and agree with the truth, and that dciodvfy finds no error in any object.

When nothing arrives, the node's own records (its database, read-only, when it is on this
machine) say why.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.algorithm import DEMO_WARNING, Concept, QaLesion, QaRegion
from dicom_node.config import SENDER, NodeConfig
from dicom_node.database import database_errors, has_database, open_reader
from dicom_node.jobs import JobKind, JobState, job_store_reading
from dicom_node.qa.peer import Received
from dicom_node.qa.phantom import Phantom
from dicom_node.qa.report import Check

if TYPE_CHECKING:
    import highdicom as hd

__all__ = [
    "check_dciodvfy",
    "check_identity",
    "check_sc",
    "check_seg_references",
    "check_seg_truth",
    "check_sr_references",
    "check_sr_truth",
    "evaluate",
    "is_demo",
    "made_by",
    "node_side",
    "pick_results",
]

ALGORITHM_NAME = "111001"  # DCM "Algorithm Name" (PS3.16 TID 4019)

PRESENT, ABSENT = codes.SCT.Present.value, codes.SCT.Absent.value

# How near the truth results must be: what the project's tests assert of the built-in
# algorithms' demo weights on their QA phantoms. Results of public weights are not held to them.
LESION_OVERLAP = 0.8  # share of a lesion segment's voxels inside the phantom's lesions
LESION_CENTRE_VOXELS = 1.5  # a reported region's centre to the lesion centre, per axis
LESION_SIZE_RTOL = 0.35
REGION_DICE = 0.8
VOLUME_RTOL = 0.2


def made_by(ds: Dataset) -> str | None:
    """The algorithm an object names as its maker (SEG: Segment Algorithm Name, PS3.3
    C.8.20.2; SR: Algorithm Name, PS3.16 TID 4019), or None when it names none."""
    for segment in ds.get("SegmentSequence") or []:
        if "SegmentAlgorithmName" in segment:
            return str(segment.SegmentAlgorithmName)

    def walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence") or [])

    for item in walk(ds.get("ContentSequence") or []):
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and concept and concept[0].CodeValue == ALGORITHM_NAME:
            return str(item.TextValue)
    return None


def is_demo(objects: dict[str, Dataset]) -> bool:
    """Whether the results were made with demo weights: their series description then always
    begins with the DEMO warning."""
    return any(
        str(ds.get("SeriesDescription", "")).startswith(DEMO_WARNING) for ds in objects.values()
    )


def pick_results(
    phantom: Phantom, received: list[Received]
) -> tuple[dict[str, Received], list[str]]:
    """One object per kind the algorithm writes, from what arrived for the study (objects
    another algorithm routed the same study to are left aside); and what was wrong. The same
    SOP instance sent again (a retried delivery) is one object, as a PACS keeps it."""
    chosen: dict[str, Received] = {}
    instances: dict[str, str] = {}
    problems: list[str] = []
    for item in received:
        if item.kind not in phantom.kinds:
            continue
        header = dcmread(item.path, stop_before_pixels=True)
        if made_by(header) not in (None, phantom.algorithm):
            continue
        uid = str(header.SOPInstanceUID)
        if item.kind in chosen and instances[item.kind] != uid:
            problems.append(f"more than one {item.kind} arrived")
        chosen.setdefault(item.kind, item)
        instances.setdefault(item.kind, uid)
    return chosen, sorted(set(problems))


def check_identity(phantom: Phantom, objects: dict[str, Dataset]) -> Check:
    """Each result is in the sent study, for the sent patient (PS3.3 C.7.1.1, C.7.2.1), in a
    new series of its own (never added to a source series)."""
    sent = phantom.first
    source_series = set(phantom.series_uids().values())
    wrong = []
    for kind, ds in sorted(objects.items()):
        if ds.StudyInstanceUID != sent.StudyInstanceUID:
            wrong.append(f"{kind} is in another study")
        if (ds.get("PatientID"), str(ds.get("PatientName"))) != (
            sent.PatientID,
            str(sent.PatientName),
        ):
            wrong.append(f"{kind} names another patient")
        if ds.SeriesInstanceUID in source_series:
            wrong.append(f"{kind} was put in a source series")
    if wrong:
        return Check(phantom.algorithm, "study and patient", "FAIL", "; ".join(wrong))
    return Check(
        phantom.algorithm,
        "study and patient",
        "PASS",
        f"{', '.join(sorted(objects))}: the sent study and patient, new series",
    )


def check_seg_references(phantom: Phantom, seg: Dataset) -> Check:
    """The SEG shares the source's Frame of Reference (PS3.3 C.7.4.1), references the sent
    series and instances (C.8.20.1 Referenced Series), and every frame derives from one sent
    image of the source series (Derivation Image Functional Group, C.7.6.16.2.6) lying where
    the frame is placed (Plane Position, C.7.6.16.2.3); further sources (the other sequences
    of a study) must be sent images at that position too."""
    name = "SEG references"
    roles = phantom.series_uids()
    sources = set(phantom.uids(phantom.primary))
    sent_by_series = {uid: set(phantom.uids(role)) for role, uid in roles.items()}
    position = {
        str(ds.SOPInstanceUID): np.asarray(ds.ImagePositionPatient, float)
        for role in roles
        for ds in phantom.headers(role)
        if "ImagePositionPatient" in ds
    }
    wrong: list[str] = []
    if seg.get("FrameOfReferenceUID") != phantom.first.get("FrameOfReferenceUID"):
        wrong.append("another frame of reference than the images sent")
    referenced = {
        str(s.SeriesInstanceUID): {
            str(i.ReferencedSOPInstanceUID) for i in s.ReferencedInstanceSequence
        }
        for s in seg.ReferencedSeriesSequence
    }
    if roles[phantom.primary] not in referenced:
        wrong.append(f"the {phantom.primary} series sent is not referenced")
    for series, instances in referenced.items():
        if series not in sent_by_series:
            wrong.append("references a series that was not sent")
        elif not instances <= sent_by_series[series]:
            wrong.append("references instances that were not sent")
    frames = seg.get("PerFrameFunctionalGroupsSequence") or []
    unsourced = misplaced = 0
    for frame in frames:
        derived = [
            str(source.ReferencedSOPInstanceUID)
            for derivation in frame.get("DerivationImageSequence") or []
            for source in derivation.SourceImageSequence
        ]
        if len(sources.intersection(derived)) != 1 or not set(derived) <= set(position):
            unsourced += 1
            continue
        placed = frame.get("PlanePositionSequence")
        at = np.asarray(placed[0].ImagePositionPatient, float) if placed else None
        if at is not None and any(not np.allclose(position[u], at, atol=1e-3) for u in derived):
            misplaced += 1
    if unsourced:
        wrong.append(f"{unsourced} of {len(frames)} frames do not derive from one sent image")
    if misplaced:
        wrong.append(f"{misplaced} of {len(frames)} frames lie elsewhere than their source")
    if not frames:
        wrong.append("no frames")
    if wrong:
        return Check(phantom.algorithm, name, "FAIL", "; ".join(wrong))
    return Check(
        phantom.algorithm,
        name,
        "PASS",
        f"{len(frames)} frames, each from a sent {phantom.primary} image at the frame's"
        f" position; same frame of reference; {len(referenced)} sent series referenced",
    )


def _segment_code(segment: Dataset) -> str:
    return str(segment.SegmentedPropertyTypeCodeSequence[0].CodeValue)


def _by_source_instance(seg: Any, uids: list[str], number: int) -> np.ndarray:
    """Segment ``number`` as a stack in the order of ``uids``, placed through each frame's own
    reference to its source image (not through positions)."""
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[number], combine_segments=True
    )
    return np.asarray(pixels).astype(bool)


def check_seg_truth(phantom: Phantom, path: Path, demo: bool) -> Check:
    """The segmented voxels lie on the phantom's truth structures, each frame placed on the
    sent image it names (PS3.3 C.8.20: Segment Sequence and Segmented Property Type)."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    uids = phantom.uids(phantom.primary)
    truth = phantom.truth
    try:
        results = []
        if truth.lesions:
            results.append(_lesions_on_truth(phantom, seg, uids))
        if truth.regions:
            results.append(_regions_on_truth(truth.regions, seg, uids))
    except (ValueError, KeyError, AttributeError) as exc:
        return Check(phantom.algorithm, "SEG on truth", "FAIL", f"cannot be placed: {exc}")
    if not results:
        return Check(phantom.algorithm, "SEG on truth", "SKIP", "no truth for a SEG")
    return _truth_check(phantom, "SEG on truth", results, demo)


def _truth_check(phantom: Phantom, name: str, results: list[tuple[bool, str]], demo: bool) -> Check:
    detail = "; ".join(text for _, text in results)
    if not demo:  # public weights: the phantom is not what they were validated on
        return Check(phantom.algorithm, name, "SKIP", f"public weights, not asserted: {detail}")
    passed = all(ok for ok, _ in results)
    return Check(phantom.algorithm, name, "PASS" if passed else "FAIL", detail)


def _primary_grid(phantom: Phantom) -> np.ndarray:
    """(frame, row, column) of the primary series' files, in the order sent, -> patient LPS
    mm: the affine the truth's masks are on, from the sent images' Image Plane attributes
    (PS3.3 C.7.6.2)."""
    images = phantom.headers(phantom.primary)
    first = images[0]
    along_row, along_column = np.split(np.asarray(first.ImageOrientationPatient, float), 2)
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, float)
    if len(images) > 1:
        step = np.asarray(images[1].ImagePositionPatient, float) - origin
    else:
        step = np.cross(along_row, along_column) * float(first.SliceThickness)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = along_column * row_mm
    affine[:3, 2] = along_row * column_mm
    affine[:3, 3] = origin
    return affine


def _voxel_of(affine: np.ndarray, point_lps_mm: Sequence[float]) -> tuple[int, int, int]:
    frame, row, column = (int(v) for v in np.rint(np.linalg.solve(affine, [*point_lps_mm, 1])[:3]))
    return frame, row, column


def _by_finding(lesions: Sequence[QaLesion]) -> dict[Concept, list[QaLesion]]:
    found: dict[Concept, list[QaLesion]] = {}
    for lesion in lesions:
        found.setdefault(lesion.finding, []).append(lesion)
    return found


def _lesions_on_truth(phantom: Phantom, seg: Any, uids: list[str]) -> tuple[bool, str]:
    """Each phantom lesion's centre lies inside a segment of its type of which at least 80 %
    of the voxels are inside the phantom's lesions of that type, and there are as many such
    segments as lesions."""
    affine = _primary_grid(phantom)
    notes, passed = [], True
    for finding, lesions in _by_finding(phantom.truth.lesions).items():
        word = finding.meaning.lower()
        numbers = [
            int(s.SegmentNumber) for s in seg.SegmentSequence if _segment_code(s) == finding.value
        ]
        if len(numbers) != len(lesions):
            return False, f"{len(numbers)} {word} segment(s); the phantom has {len(lesions)}"
        truth = np.any([lesion.mask for lesion in lesions], axis=0)
        for lesion in lesions:
            centre = _voxel_of(affine, lesion.center_lps_mm)
            hits = [n for n in numbers if _by_source_instance(seg, uids, n)[centre]]
            if not hits:
                return False, f"the {word} centre at voxel {centre} is in no {word} segment"
            mask = _by_source_instance(seg, uids, hits[0])
            overlap = float((mask & truth).sum()) / float(mask.sum())
            passed &= overlap >= LESION_OVERLAP
            notes.append(
                f"{word} centre inside segment {hits[0]}; {overlap:.0%} of its"
                f" {int(mask.sum())} voxels on the {word} (>= {LESION_OVERLAP:.0%})"
            )
    return passed, "; ".join(notes)


def _regions_on_truth(regions: Sequence[QaRegion], seg: Any, uids: list[str]) -> tuple[bool, str]:
    """Each region's Dice with the phantom's is at least 0.8."""
    truths = {region.property_type.value: region for region in regions}
    scores: dict[str, float] = {}
    for segment in seg.SegmentSequence:
        code = _segment_code(segment)
        if code in truths:
            mask = _by_source_instance(seg, uids, int(segment.SegmentNumber))
            truth = truths[code].mask
            scores[code] = (
                2.0 * float((mask & truth).sum()) / max(1.0, float(mask.sum() + truth.sum()))
            )
    missing = [region.name for code, region in truths.items() if code not in scores]
    if missing:
        return False, f"no segment for {', '.join(missing)}"
    text = ", ".join(f"{truths[c].name} {s:.2f}" for c, s in scores.items())
    return min(scores.values()) >= REGION_DICE, f"Dice {text} (>= {REGION_DICE})"


def _measurement_report(
    sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR,
) -> hd.sr.MeasurementReport:
    """A report's TID 1500 content (highdicom types ``content`` as the base sequence)."""
    import highdicom as hd

    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("the report's content is not a Measurement Report (TID 1500)")
    return content


def _evidence(sr: Dataset) -> set[str]:
    """SOP Instance UIDs in the Current Requested Procedure Evidence (PS3.3 C.17.2.2)."""
    return {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence") or []
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _finding(
    group: hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> str | None:
    """The code value of a measurement group's Finding (TID 1501, 1410, 1411), if any."""
    return None if group.finding_type is None else str(group.finding_type.value)


def _region_image(group: Any) -> str:
    return str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def check_sr_references(phantom: Phantom, path: Path, seg: Dataset | None) -> Check:
    """The TID 1500 report's evidence lists the sent images (and the SEG), each image region
    (TID 1410) is on a sent image of the source series, each volumetric group (TID 1411) is on
    a segment of the SEG that arrived, and a classification (TID 1501) names the sent image."""
    import highdicom as hd

    name = "SR references"
    sr = hd.sr.srread(path)
    sources = set(phantom.uids(phantom.primary))
    wrong: list[str] = []
    evidence = _evidence(sr)
    if not sources <= evidence:
        wrong.append(f"{len(sources - evidence)} sent image(s) missing from its evidence")
    if seg is not None and str(seg.SOPInstanceUID) not in evidence:
        wrong.append("the SEG is missing from its evidence")
    content = _measurement_report(sr)
    planar = content.get_planar_roi_measurement_groups()
    volumetric = content.get_volumetric_roi_measurement_groups()
    images = content.get_image_measurement_groups()
    off_images = [g for g in planar if _region_image(g) not in sources]
    if off_images:
        wrong.append(f"{len(off_images)} region(s) on images that were not sent")
    segments = {int(s.SegmentNumber) for s in (seg.SegmentSequence if seg is not None else [])}
    for volume in volumetric:
        reference = volume.referenced_segment
        if (
            seg is None
            or reference is None
            or reference.referenced_sop_instance_uid != seg.SOPInstanceUID
        ):
            wrong.append("a volume refers to another segmentation than the SEG that arrived")
        elif not set(reference.referenced_segment_numbers or ()) <= segments:
            wrong.append("a volume refers to a segment the SEG does not have")
    classified = [g for g in images if g.source_images]
    for classification in classified:
        if {str(i.referenced_sop_instance_uid) for i in classification.source_images} - sources:
            wrong.append("a classification names an image that was not sent")
    if wrong:
        return Check(phantom.algorithm, name, "FAIL", "; ".join(sorted(set(wrong))))
    return Check(
        phantom.algorithm,
        name,
        "PASS",
        f"evidence: {len(sources)} sent image(s){' and the SEG' if seg is not None else ''};"
        f" {len(planar)} region(s) on sent images, {len(volumetric)} volume(s) on SEG"
        f" segments, {len(classified)} classification(s) of the sent image",
    )


def check_sr_truth(phantom: Phantom, path: Path, demo: bool) -> Check:
    """The report's measurements agree with the phantom (what the project's tests assert of
    the built-in demo weights): each lesion's circle is centred on it and its diameter near
    the lesion's; a region's volume; a classification Present when the phantom shows the
    finding, Absent when it does not."""
    import highdicom as hd

    content = _measurement_report(hd.sr.srread(path))
    truth = phantom.truth
    try:
        results = [_lesions_in_report(phantom, content)] if truth.lesions else []
        results += [_volume_in_report(phantom, r, content) for r in truth.regions if r.volume]
        results += [
            _classification_in_report(finding, present, content)
            for finding, present in truth.classifications.items()
        ]
    except (ValueError, KeyError, AttributeError, IndexError) as exc:
        return Check(phantom.algorithm, "SR on truth", "FAIL", f"unreadable: {exc}")
    if not results:
        return Check(phantom.algorithm, "SR on truth", "SKIP", "no truth for a report")
    return _truth_check(phantom, "SR on truth", results, demo)


def _region_offset_voxels(
    group: Any, image: Dataset, point_lps_mm: Sequence[float]
) -> tuple[float, float]:
    """How far a region's centre is from a point: in-plane in pixels (the larger of the two
    directions) and through the plane in slice thicknesses. Graphic data are (column, row)
    with a pixel centre at (c + 0.5, r + 0.5) (PS3.3 C.18.6.1.1); the closing vertex is
    dropped."""
    column, row = (np.asarray(group.roi.value, dtype=float)[:-1] - 0.5).mean(axis=0)
    position = np.asarray(image.ImagePositionPatient, float)
    along_row, along_column = np.split(np.asarray(image.ImageOrientationPatient, float), 2)
    row_mm, column_mm = (float(v) for v in image.PixelSpacing)
    centre = position + column * column_mm * along_row + row * row_mm * along_column
    offset = centre - np.asarray(point_lps_mm, float)
    in_plane = max(
        abs(float(offset @ along_row)) / column_mm, abs(float(offset @ along_column)) / row_mm
    )
    through = abs(float(offset @ np.cross(along_row, along_column)))
    return in_plane, through / float(image.SliceThickness)


def _lesions_in_report(phantom: Phantom, content: hd.sr.MeasurementReport) -> tuple[bool, str]:
    images = dict(zip(phantom.uids(phantom.primary), phantom.headers(phantom.primary), strict=True))
    passed, notes = True, []
    for finding, lesions in _by_finding(phantom.truth.lesions).items():
        word = finding.meaning.lower()
        groups = [
            g for g in content.get_planar_roi_measurement_groups() if _finding(g) == finding.value
        ]
        if len(groups) != len(lesions):
            return False, f"{len(groups)} {word}(s) reported; the phantom has {len(lesions)}"
        for lesion in lesions:
            placed = [
                (_region_offset_voxels(g, images[_region_image(g)], lesion.center_lps_mm), g)
                for g in groups
            ]
            (in_plane, through), group = min(placed, key=lambda p: max(p[0]))
            # The circle is drawn on the source slice nearest the finding's centre: up to half
            # a slice further from the lesion than the finding itself.
            close = in_plane <= LESION_CENTRE_VOXELS and through <= LESION_CENTRE_VOXELS + 0.5
            (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
            size_ok = abs(float(diameter.value) - lesion.diameter_mm) <= (
                LESION_SIZE_RTOL * lesion.diameter_mm
            )
            passed &= close and size_ok
            notes.append(
                f"circle centre {in_plane:.1f} pixel(s) in plane and {through:.1f} slice(s)"
                f" from the {word} centre; diameter {float(diameter.value):.1f} mm"
                f" (phantom {lesion.diameter_mm:.1f} mm)"
            )
    return passed, "; ".join(notes)


def _volume_in_report(
    phantom: Phantom, region: QaRegion, content: hd.sr.MeasurementReport
) -> tuple[bool, str]:
    groups = [
        g
        for g in content.get_volumetric_roi_measurement_groups()
        if _finding(g) == region.property_type.value
    ]
    if len(groups) != 1:
        return False, f"{len(groups)} {region.name} volume(s) reported, expected one"
    (volume,) = groups[0].get_measurements(name=codes.SCT.Volume)
    voxel_ml = float(abs(np.linalg.det(_primary_grid(phantom)[:3, :3]))) / 1000.0
    truth_ml = float(region.mask.sum()) * voxel_ml
    value = float(volume.value) / (1000.0 if volume.unit.value == "mm3" else 1.0)
    ok = abs(value - truth_ml) <= VOLUME_RTOL * truth_ml
    return ok, (
        f"{region.name} {value:.1f} mL, phantom {truth_ml:.1f} mL"
        f" (within {VOLUME_RTOL * 100:.0f} %)"
    )


def _classification_in_report(
    finding: Concept, present: bool, content: hd.sr.MeasurementReport
) -> tuple[bool, str]:
    """The classification (TID 1501) says Present for a phantom that shows the finding,
    Absent for one that does not."""
    word = finding.meaning.lower()
    expected = PRESENT if present else ABSENT
    words = {PRESENT: "Present", ABSENT: "Absent"}
    for group in content.get_image_measurement_groups():
        if _finding(group) != finding.value:
            continue
        (evaluation,) = group.get_qualitative_evaluations()
        (probability,) = group.get_measurements()
        # highdicom annotates a qualitative evaluation's value as a number; it is the code.
        said = evaluation.value.value  # type: ignore[union-attr]
        return said == expected, (
            f"{word} {words.get(said, said)} (probability {float(probability.value):.2f}),"
            f" expected {words[expected]}"
        )
    return False, f"no {word} classification in the report"


def check_sc(phantom: Phantom, sc: Dataset) -> Check:
    """The heat-map capture (PS3.3 A.8) is on the radiograph's pixel grid."""
    sent = phantom.first
    grid = (int(sc.Rows), int(sc.Columns))
    if grid != (int(sent.Rows), int(sent.Columns)):
        return Check(
            phantom.algorithm,
            "SC grid",
            "FAIL",
            f"{grid[0]} x {grid[1]}, the radiograph is {sent.Rows} x {sent.Columns}",
        )
    return Check(
        phantom.algorithm,
        "SC grid",
        "PASS",
        f"{grid[0]} x {grid[1]} {sc.PhotometricInterpretation}, the radiograph's grid",
    )


def dciodvfy_tool() -> str | None:
    """dicom3tools' dciodvfy; Debian's first, as the project's tests find it."""
    debian = Path("/usr/bin/dciodvfy")
    return str(debian) if debian.exists() else shutil.which("dciodvfy")


def check_dciodvfy(algorithm: str, kind: str, path: Path) -> Check:
    """dciodvfy checks the object against its IOD (PS3.3) and the encoding rules (PS3.5):
    no error passes; warnings are counted."""
    name = f"dciodvfy {kind}"
    tool = dciodvfy_tool()
    if tool is None:
        return Check(algorithm, name, "SKIP", "(dciodvfy not installed)")
    try:
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return Check(algorithm, name, "FAIL", "dciodvfy did not finish in 120 s")
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    detail = f"{len(errors)} error(s), {len(warnings)} warning(s)"
    if errors:
        return Check(algorithm, name, "FAIL", f"{detail}; first: {errors[0]}")
    return Check(algorithm, name, "PASS", detail)


def node_side(config: NodeConfig, phantom: Phantom) -> str | None:
    """What the node's own records say became of a study, when its database is on this
    machine (read-only; None otherwise): why nothing came back is the first question."""
    if not has_database(config):
        return None
    study = str(phantom.first.StudyInstanceUID)
    subjects = [study, *phantom.series_uids().values()]
    try:
        with open_reader(config) as conn:
            stored = conn.execute(
                "SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study,)
            ).fetchone()[0]
            store = job_store_reading(conn)
            jobs = [
                j
                for j in store.recent(JobKind.INFERENCE, subject_uids=subjects)
                if j.inference.algorithm == phantom.algorithm
            ]
            deliveries = store.deliveries_of([j.id for j in jobs[:1]])
    except database_errors():
        return None
    if not stored:
        return "the node's records hold nothing of the study"
    if not jobs:
        return f"the node stored {stored} instance(s) but made no {phantom.algorithm} job"
    job = jobs[0]  # the newest
    error = f": {job.error}" if job.error else ""
    if job.state is not JobState.SUCCEEDED:
        why = {
            JobState.QUEUED: "not started (is a worker running?)",
            JobState.RUNNING: "still running",
        }
        return f"node job {job.id} {why.get(job.state, 'failed')}{error}"
    sender = [d for d in deliveries.get(job.id, []) if d.destination == SENDER]
    if not sender:
        return f"node job {job.id} succeeded, but nothing was to be sent to the sender"
    delivery = sender[0]
    return (
        f"node job {job.id} succeeded; its delivery to sender ({delivery.peer_aet}) is"
        f" {delivery.state.value} after {delivery.attempts} attempt(s)"
        + (f": {delivery.last_error}" if delivery.last_error else "")
    )


def evaluate(
    phantom: Phantom,
    received: list[Received],
    sent_at: float,
    timeout_s: float,
    config: NodeConfig,
) -> list[Check]:
    """Every check of one study's results."""
    algorithm = phantom.algorithm
    chosen, problems = pick_results(phantom, received)
    objects: dict[str, Dataset] = {kind: dcmread(item.path) for kind, item in chosen.items()}
    demo = is_demo(objects)
    missing = sorted(phantom.kinds - chosen.keys())
    if not chosen:
        return [
            Check(
                algorithm,
                "results arrived",
                "FAIL",
                f"nothing within {timeout_s:.0f} s; "
                + (node_side(config, phantom) or "see 'dicom-node jobs' on the node"),
            )
        ]
    waited = max(item.at for item in chosen.values()) - sent_at
    arrived = f"{', '.join(sorted(chosen))} {waited:.1f} s after sending"
    # With public weights a phantom nodule may go unseen; the report then says so and no
    # SEG is written, which is not the node's fault.
    seg_optional = missing == ["SEG"] and not demo
    if problems or (missing and not seg_optional):
        why = [*problems, *([f"no {', '.join(missing)}"] if missing else [])]
        checks = [Check(algorithm, "results arrived", "FAIL", f"{arrived}; {'; '.join(why)}")]
    else:
        note = "; no SEG (public weights found nothing)" if seg_optional else ""
        checks = [Check(algorithm, "results arrived", "PASS", arrived + note)]
    checks.append(check_identity(phantom, objects))
    seg = objects.get("SEG")
    if "SEG" in phantom.kinds:
        if seg is None:
            checks += [
                Check(algorithm, n, "SKIP" if seg_optional else "FAIL", "no SEG arrived")
                for n in ("SEG references", "SEG on truth")
            ]
        else:
            checks.append(check_seg_references(phantom, seg))
            checks.append(check_seg_truth(phantom, chosen["SEG"].path, demo))
    if "SR" in chosen:
        checks.append(check_sr_references(phantom, chosen["SR"].path, seg))
        checks.append(check_sr_truth(phantom, chosen["SR"].path, demo))
    else:
        checks += [
            Check(algorithm, n, "FAIL", "no SR arrived") for n in ("SR references", "SR on truth")
        ]
    if "SC" in phantom.kinds:
        sc = objects.get("SC")
        checks.append(
            check_sc(phantom, sc)
            if sc is not None
            else Check(algorithm, "SC grid", "FAIL", "no SC arrived")
        )
    checks += [check_dciodvfy(algorithm, kind, item.path) for kind, item in sorted(chosen.items())]
    return checks
