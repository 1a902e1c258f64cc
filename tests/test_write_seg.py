"""SEG written from masks lands on the right voxel, whatever the acquisition plane or order.

Masks come from the phantoms' own geometry (no model), so these tests are about the writer:
the SEG read back with highdicom must equal the masks voxel for voxel in the source grid, and
the reference validators (dicom3tools) must find no error.
"""

from __future__ import annotations

import logging
import random
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread

from dicom_node.algorithm import AlgorithmResult, Concept, LabelMask, SeriesInput, Weights
from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.write import Provenance, WriteError, result_series_number, segmentation
from tests.support.cases import NODULE, PLANES, PROVENANCE, masks_for, phantom
from tests.support.dicomfiles import dciodvfy
from tests.support.peers import require_tool

ANATOMY = Concept("SCT", "91723000", "Anatomical structure")


def written(
    tmp_path: Path, spec: CtPhantomSpec, omit_empty_frames: bool = True
) -> tuple[list[Path], SeriesInput, list[LabelMask], Path]:
    paths = write_ct_series(tmp_path / "ct", spec)
    shuffled = list(paths)
    random.Random(1).shuffle(shuffled)  # the order the node hands over means nothing
    series = SeriesInput("1", tuple(shuffled))
    masks = masks_for(spec, series.volume())
    assert masks[0].array.sum() > 50
    result = AlgorithmResult("test-geometry", "1.0", demo=True, masks=masks)
    seg = segmentation(
        result,
        {"series": series},
        PROVENANCE,
        series_number=901,
        omit_empty_frames=omit_empty_frames,
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    return paths, series, masks, path


@pytest.mark.unit
@pytest.mark.parametrize("omit_empty_frames", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("reversed_order", [False, True], ids=["ordered", "reversed"])
@pytest.mark.parametrize("plane", PLANES)
def test_seg_round_trip_is_voxel_exact(tmp_path, plane, reversed_order, omit_empty_frames) -> None:
    spec = phantom(plane, reversed_order)
    paths, series, masks, path = written(tmp_path, spec, omit_empty_frames)
    volume = series.volume()
    seg = hd.seg.segread(path)
    for number, mask in enumerate(masks, 1):
        back = seg.get_volume(segment_numbers=[number], combine_segments=True)
        assert np.array_equal(back.match_geometry(volume).array.astype(bool), mask.array), (
            f"{plane}: segment {number} differs"
        )
    # Frame by frame too, through the source instances, in the order they were stored.
    uids = [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    by_instance = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True
    )
    truth = spec.nodule_mask()  # acquisition order, as ``paths``
    if spec.reversed_order:
        truth = truth[::-1]
    assert np.array_equal(by_instance.astype(bool), truth)
    # Each frame references its source instance; sparse: a frame only where a segment is.
    referenced = [
        item.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for item in derivation.SourceImageSequence
    ]
    assert set(referenced) <= set(uids)
    slices_with = [int(m.array.any(axis=(1, 2)).sum()) for m in masks]
    expected = sum(slices_with) if omit_empty_frames else len(masks) * len(uids)
    assert seg.NumberOfFrames == len(referenced) == expected


@pytest.mark.integration
@pytest.mark.parametrize("plane", PLANES)
def test_seg_passes_the_reference_validators(tmp_path, plane) -> None:
    paths, _, _, path = written(tmp_path, phantom(plane, reversed_order=True))
    report = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    output = report.stdout + report.stderr
    assert "Error" not in output, output
    assert "Warning" not in output, output
    consistency = subprocess.run(
        [require_tool("dcentvfy"), *map(str, paths), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Error" not in consistency.stdout + consistency.stderr, consistency.stdout
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        seg = dcmread(path)
        seg.PixelData  # noqa: B018 - every element parsed under RAISE
        for element in seg.iterall():
            element.value  # noqa: B018
    finally:
        pydicom_config.settings.reading_validation_mode = previous
    assert seg.SeriesDescription.startswith("DEMO MODEL - NOT FOR CLINICAL USE")
    assert str(seg.ContentCreatorName) == "test-geometry^"
    assert seg.StudyInstanceUID == dcmread(paths[0]).StudyInstanceUID
    (segment, _) = seg.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    parameters = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert "ab" * 32 in str(parameters.AlgorithmParameters)


@pytest.mark.unit
def test_spacing_between_slices_of_the_source_does_not_leak(tmp_path) -> None:
    spec = phantom("axial", reversed_order=False)
    paths = write_ct_series(tmp_path / "ct", spec)
    for path in paths:  # a scanner that fills the attribute with something else
        ds = dcmread(path)
        ds.SpacingBetweenSlices = 5.0
        ds.save_as(path)
    series = SeriesInput("1", tuple(paths))
    result = AlgorithmResult("t", "1", demo=False, masks=masks_for(spec, series.volume()))
    seg = segmentation(result, {"series": series}, PROVENANCE, series_number=1)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(spec.slice_thickness_mm)


SLOPPY = {  # as modalities in the wild write them
    "PatientBirthDate": "1923-04-17",
    "StudyDate": "2026/11/24",
    "StudyTime": "12:30:00",
    "PatientSex": "Female",
}


@pytest.mark.integration
def test_invalid_copied_patient_and_study_values_are_left_empty_not_fatal(tmp_path, caplog) -> None:
    """highdicom refuses a source whose copied date, time or sex breaks its VR: the results
    carry those Type 2 attributes empty instead, the source stays as it was, the objects
    pass dciodvfy, and the log names the attributes, not their values."""
    spec = phantom("axial", reversed_order=False)
    paths = write_ct_series(tmp_path / "ct", spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR", UserWarning)
        for path in paths:
            ds = dcmread(path)
            for keyword, value in SLOPPY.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    series = SeriesInput("1", tuple(paths))
    result = AlgorithmResult("t", "1", demo=False, masks=masks_for(spec, series.volume()))
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        seg = segmentation(result, {"series": series}, PROVENANCE, series_number=1)
    assert all(seg[k].value == "" for k in SLOPPY)
    assert seg.PatientName == series.datasets()[0].PatientName
    assert all(ds[k].value == v for ds in series.datasets() for k, v in SLOPPY.items())
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    # Empty as the source made them: only a DICOMDIR would miss the study's date and time.
    assert dciodvfy(path, from_source=("needed to build DICOMDIR - Study",)) == []
    # (pydicom's own warnings quote the values: the node logs them at DEBUG, see test_security.)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("dicom_node"))
    assert all(k in logged for k in SLOPPY) and not any(v in logged for v in SLOPPY.values())


@pytest.mark.unit
def test_masks_that_say_nothing_or_do_not_fit_are_refused(tmp_path) -> None:
    spec = phantom("axial", reversed_order=False)
    series = SeriesInput("1", tuple(write_ct_series(tmp_path / "ct", spec)))
    shape = series.volume().spatial_shape
    unnamed = AlgorithmResult("t", "1", demo=False, masks=[LabelMask("x", np.ones(shape))])
    with pytest.raises(WriteError, match="does not say what it is"):
        segmentation(unnamed, {"series": series}, PROVENANCE, series_number=1)
    wrong = AlgorithmResult(
        "t", "1", demo=False, masks=[LabelMask("x", np.ones((2, 2, 2)), property_type=NODULE)]
    )
    with pytest.raises(WriteError, match="not on series's grid"):
        segmentation(wrong, {"series": series}, PROVENANCE, series_number=1)


@pytest.mark.unit
def test_series_description_is_configurable_but_demo_always_says_so() -> None:
    from dicom_node.config import load_config
    from dicom_node.errors import ConfigError

    public = Provenance(
        "lung", "1", Weights(None, "cd" * 32, demo=False), "CAD {kind} ({algorithm})"
    )
    assert public.series_description("SEG") == "CAD SEG (lung)"
    demo = Provenance("lung", "1", Weights(None, None, demo=True), "CAD {kind}")
    assert demo.series_description("SR") == "DEMO MODEL - NOT FOR CLINICAL USE CAD SR"
    with pytest.raises(ConfigError, match=r"results\.series_description"):
        load_config(None, environ={"DICOM_NODE__RESULTS__SERIES_DESCRIPTION": "AI {model}"})


@pytest.mark.integration
def test_the_results_of_two_reconstructions_say_which_series_they_come_from(tmp_path) -> None:
    """Two reconstructions of one study (thin and thick slices): each result's Series Number
    is its source's followed by 01 (SEG), 02 (SR), and its description names the source's,
    so a PACS list tells them apart; demo weights keep the warning first and still show the
    source; a source with no usable Series Number gets the configured one."""
    from dicom_node.config import ResultsConfig
    from dicom_node.write import write_all

    study = "1.2.826.0.1.3680043.8.498.1"
    numbers = ResultsConfig()
    seen = {}
    for number, description, thickness in (
        (3, "Thorax 1.0 B70f", 1.0),
        (5, "Thorax 5.0 B31f", 5.0),
    ):
        spec = CtPhantomSpec(
            slices=6, rows=24, columns=24, slice_thickness_mm=thickness, study_uid=study
        )
        paths = write_ct_series(tmp_path / description, spec)
        for path in paths:
            ds = dcmread(path)
            ds.SeriesNumber, ds.SeriesDescription = number, description
            ds.save_as(path)
        series = SeriesInput("1", tuple(paths))
        result = AlgorithmResult("lung", "1", demo=False, masks=masks_for(spec, series.volume()))
        public = Provenance("lung", "1", Weights(None, "cd" * 32, demo=False))
        written = write_all(result, {"series": series}, public, tmp_path / f"out{number}", numbers)
        for w in written:
            back = dcmread(w.path, stop_before_pixels=True)
            seen[(number, w.kind)] = (back.SeriesNumber, back.SeriesDescription)
            assert dciodvfy(w.path) == []
    assert seen == {
        (3, "SEG"): (301, "AI lung SEG: Thorax 1.0 B70f"),
        (3, "SR"): (302, "AI lung SR: Thorax 1.0 B70f"),
        (5, "SEG"): (501, "AI lung SEG: Thorax 5.0 B31f"),
        (5, "SR"): (502, "AI lung SR: Thorax 5.0 B31f"),
    }
    source = dcmread(paths[0])
    demo = Provenance("lung-nodules-ct", "1", Weights(None, None, demo=True))
    assert demo.series_description("SEG", source) == (
        "DEMO MODEL - NOT FOR CLINICAL USE AI SEG: Thorax 5.0 B31f"
    )
    assert len(demo.series_description("SEG", source)) <= 64
    source.SeriesNumber = ""  # Type 2: may be empty
    assert result_series_number(source, "SEG", numbers.seg_series_number) == 9901
    source.SeriesNumber = 2**31 - 1
    assert result_series_number(source, "SR", numbers.sr_series_number) == 9902
