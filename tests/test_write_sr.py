"""TID 1500 SR from results: points on the right voxel, segments referenced, negatives said."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicom_node.algorithm import AlgorithmResult, Classification, Concept, SeriesInput
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.write import measurement_report, segmentation
from tests.support.cases import PLANES, PROVENANCE, ct_case
from tests.support.dicomfiles import dciodvfy
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

PNEUMONIA = Concept("SCT", "233604007", "Pneumonia")


def seg_and_sr(tmp_path: Path, series: SeriesInput, result: AlgorithmResult):
    """The SEG and the SR of ``result``, the SR saved (and valid) as ``sr.dcm``."""
    inputs = {"series": series}
    seg = segmentation(result, inputs, PROVENANCE, series_number=901)
    sr = measurement_report(result, inputs, PROVENANCE, series_number=902, segmentation=seg)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert dciodvfy(path) == []
    return seg, path


@pytest.mark.parametrize("plane", PLANES)
def test_sr_region_lies_on_the_finding_and_segments_are_referenced(tmp_path, plane) -> None:
    spec, paths, series, result = ct_case(tmp_path, plane)
    seg, path = seg_and_sr(tmp_path, series, result)
    seg.save_as(tmp_path / "seg.dcm")
    consistency = subprocess.run(
        [require_tool("dcentvfy"), *map(str, paths), str(tmp_path / "seg.dcm"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Error" not in consistency.stdout + consistency.stderr, consistency.stdout
    back = hd.sr.srread(path)
    segments = {s.SegmentLabel: s.TrackingUID for s in seg.SegmentSequence}
    planar = {g.tracking_uid: g for g in back.content.get_planar_roi_measurement_groups()}
    # One lesion, one tracking UID: each segment's planar and volumetric groups carry its UID.
    assert set(planar) == set(segments.values())
    volumetric = back.content.get_volumetric_roi_measurement_groups()
    assert sorted(g.tracking_uid for g in volumetric) == sorted(segments.values())
    images = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}

    def region_in_patient(group) -> tuple[np.ndarray, np.ndarray]:
        """The region's vertices (closing one dropped) in LPS mm, and its image's normal."""
        region = group.roi
        uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        image = dcmread(images[uid], stop_before_pixels=True)
        column, row = (np.asarray(region.value, dtype=float)[:-1] - 0.5).T  # voxel centres
        position = np.asarray(image.ImagePositionPatient, float)
        orientation = np.asarray(image.ImageOrientationPatient, float)
        row_mm, column_mm = (float(v) for v in image.PixelSpacing)
        points = (
            position
            + np.outer(column * column_mm, orientation[:3])
            + np.outer(row * row_mm, orientation[3:])
        )
        return points, np.cross(orientation[:3], orientation[3:])

    # The nodule's circle is centred on the finding, on the slice through it.
    points, normal = region_in_patient(planar[segments["Nodule 1"]])
    row_mm, column_mm = spec.pixel_spacing_mm
    offset = points.mean(axis=0) - np.asarray(spec.nodules[0].center_lps_mm)
    in_plane = offset - np.dot(offset, normal) * normal
    assert np.linalg.norm(in_plane) <= max(row_mm, column_mm), (plane, in_plane)
    assert abs(np.dot(offset, normal)) <= spec.slice_thickness_mm / 2 + 1e-6
    # The body's outline runs along the mask's edge on the slice where the mask is largest.
    volume = series.volume()
    body = result.masks[1].array
    points, _ = region_in_patient(planar[segments["Body"]])
    voxels = np.rint(volume.map_reference_to_indices(points)).astype(int)
    (frame,) = set(voxels[:, 0])
    areas = body.reshape(len(body), -1).sum(axis=1)
    assert areas[frame] == areas.max()
    assert body[tuple(voxels.T)].all(), "an outline vertex lies outside the mask"
    inner = ndimage.binary_erosion(body[frame])
    assert not inner[voxels[:, 1], voxels[:, 2]].any(), "an outline vertex is inside the mask"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert back.SeriesDescription.startswith("DEMO MODEL - NOT FOR CLINICAL USE")


def test_nothing_found_is_said(tmp_path) -> None:
    _, _, series, result = ct_case(tmp_path, "axial", with_nodule=False)
    _, path = seg_and_sr(tmp_path, series, result)
    back = hd.sr.srread(path)
    groups = back.content.get_planar_roi_measurement_groups()
    assert [g.finding_type.meaning for g in groups] == ["Entire body"]  # no nodule
    text = str(back)
    assert "Nodule" in text and "Absent" in text


def test_an_empty_mask_is_stated_with_no_region(tmp_path) -> None:
    _, _, series, result = ct_case(tmp_path, "axial", with_nodule=False)
    result.masks[0].array[:] = False
    _, path = seg_and_sr(tmp_path, series, result)
    back = hd.sr.srread(path)
    assert back.content.get_planar_roi_measurement_groups() == []
    (group,) = back.content.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == 0 and volume.unit.value == "mL"


@pytest.mark.parametrize("positive", [True, False])
def test_classification_of_a_radiograph_is_present_or_absent(tmp_path, positive) -> None:
    path = tmp_path / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=64, columns=80)).save_as(path, enforce_file_format=True)
    probability = 0.81 if positive else 0.12
    result = AlgorithmResult(
        "pneumonia-test",
        "1",
        demo=True,
        classifications=[Classification("Pneumonia", probability, 0.5, finding=PNEUMONIA)],
    )
    sr = measurement_report(
        result, {"series": SeriesInput("1", (path,))}, PROVENANCE, series_number=903
    )
    out = tmp_path / "sr.dcm"
    sr.save_as(out)
    assert dciodvfy(out) == []
    text = str(hd.sr.srread(out))
    assert "Pneumonia" in text
    assert ("Present" if positive else "Absent") in text
    assert f"{probability}" in text
    assert dcmread(path).SOPInstanceUID in text


# Type 2 patient and study attributes highdicom reads from the source as attributes; real
# radiographs and CRs often lack them (issue 14, item 2).
TYPE_2_READ = (
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def test_a_source_without_type_2_attributes_or_with_a_broken_sequence_gets_valid_results(
    tmp_path, caplog
) -> None:
    """The SEG and SR of a CT that lacks the Type 2 patient and study attributes and has a
    Referenced Study Sequence item without its Referenced SOP Class UID: both valid, the
    attributes empty, the sequence left out, and the log names them without their values."""
    _, paths, _, result = ct_case(tmp_path, "axial")
    for path in paths:
        ds = dcmread(path)
        for keyword in TYPE_2_READ:
            delattr(ds, keyword)
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3.4.5"
        ds.ReferencedStudySequence = [item]
        ds.save_as(path)
    series = SeriesInput("1", tuple(paths))
    inputs = {"series": series}
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        seg = segmentation(result, inputs, PROVENANCE, series_number=901)
        sr = measurement_report(result, inputs, PROVENANCE, series_number=902, segmentation=seg)
    for name, dataset in (("seg", seg), ("sr", sr)):
        out = tmp_path / f"{name}.dcm"
        dataset.save_as(out)
        # Empty as the source left them: only a DICOMDIR would miss the study's ID and date.
        assert dciodvfy(out, from_source=("needed to build DICOMDIR", "Study ID")) == []
        assert all(dataset[k].value in ("", None) for k in TYPE_2_READ)
        assert "ReferencedStudySequence" not in dataset
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(k in logged for k in (*TYPE_2_READ, "ReferencedStudySequence"))
    assert "1.2.3.4.5" not in logged
    assert "ReferencedStudySequence" in series.datasets()[0]  # the source is not changed
