"""TID 1500 SR from results: points on the right voxel, segments referenced, negatives said."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.algorithm import AlgorithmResult, Classification, Concept, Finding, SeriesInput
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset, write_ct_series
from dicom_node.write import measurement_report, segmentation
from tests.conftest import require_tool
from tests.dicomfiles import dciodvfy
from tests.test_write_seg import LUNG, NODULE, PLANES, PROVENANCE, masks_for, phantom

PNEUMONIA = Concept("SCT", "233604007", "Pneumonia")


def ct_case(tmp_path: Path, plane: str, *, with_nodule: bool = True):
    spec = phantom(plane, reversed_order=True)
    paths = write_ct_series(tmp_path / "ct", spec)
    shuffled = list(paths)
    random.Random(2).shuffle(shuffled)
    series = SeriesInput("1", tuple(shuffled))
    masks = masks_for(spec, series.volume())
    (nodule,) = spec.nodules
    findings = [
        Finding(
            "Nodule",
            nodule.center_lps_mm,
            (9.0, 9.0, 9.0),
            0.93,
            mask="Nodule 1",
            finding_type=NODULE,
            site=LUNG,
        )
    ]
    result = AlgorithmResult(
        "test-geometry",
        "1.0",
        demo=True,
        masks=masks if with_nodule else masks[1:],
        findings=findings if with_nodule else [],
        looked_for=[NODULE],
    )
    return spec, paths, series, result


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
    (planar,) = back.content.get_planar_roi_measurement_groups()
    region = planar.roi
    uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    (image,) = [
        dcmread(p) for p in paths if dcmread(p, stop_before_pixels=True).SOPInstanceUID == uid
    ]
    points = np.asarray(region.value, dtype=float)[:-1]  # closed polyline: last = first
    column, row = points.mean(axis=0) - 0.5  # back to voxel-centre indices
    position = np.asarray(image.ImagePositionPatient, float)
    orientation = np.asarray(image.ImageOrientationPatient, float)
    row_mm, column_mm = (float(v) for v in image.PixelSpacing)
    point = position + orientation[:3] * column * column_mm + orientation[3:] * row * row_mm
    center = np.asarray(spec.nodules[0].center_lps_mm)
    normal = np.cross(orientation[:3], orientation[3:])
    in_plane = (point - center) - np.dot(point - center, normal) * normal
    assert np.linalg.norm(in_plane) <= max(row_mm, column_mm), (plane, in_plane)
    assert abs(np.dot(point - center, normal)) <= spec.slice_thickness_mm / 2 + 1e-6
    # One volumetric group per segment, each on its segment, tracked by its UID.
    volumetric = back.content.get_volumetric_roi_measurement_groups()
    segments = {s.SegmentNumber: s.TrackingUID for s in seg.SegmentSequence}
    assert len(volumetric) == len(segments)
    assert {group.tracking_uid for group in volumetric} == set(segments.values())
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
    assert back.content.get_planar_roi_measurement_groups() == []
    text = str(back)
    assert "Nodule" in text and "Absent" in text


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
