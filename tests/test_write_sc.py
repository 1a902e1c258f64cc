"""The heat-map Secondary Capture: the overlay where the heat is, the verdict burned in."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread

from dicom_node.algorithm import AlgorithmResult, Classification, HeatMap, SeriesInput, Weights
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.write import Provenance, WriteError, heat_map_capture
from tests.support.cases import capture_of
from tests.support.dicomfiles import CORPUS_SOURCE_WARNINGS, dciodvfy
from tests.support.paths import CORPUS_CXR


@pytest.mark.integration
@pytest.mark.parametrize("source", ["phantom", "corpus"])
def test_heat_map_capture_is_valid_and_shows_the_heat(tmp_path, corpus, source) -> None:
    if source == "corpus":
        path = corpus / CORPUS_CXR
    else:
        path = tmp_path / "cxr.dcm"
        cxr_dataset(CxrPhantomSpec(rows=1000, columns=820)).save_as(path, enforce_file_format=True)
    capture, (row, column) = capture_of(path, 0.81)
    out = tmp_path / "sc.dcm"
    capture.save_as(out)
    assert dciodvfy(out, from_source=CORPUS_SOURCE_WARNINGS if source == "corpus" else ()) == []
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        back = dcmread(out)
    finally:
        pydicom_config.settings.reading_validation_mode = previous
    source_ds = dcmread(path)
    assert back.BurnedInAnnotation == "YES"
    assert back.StudyInstanceUID == source_ds.StudyInstanceUID
    assert back.PatientID == source_ds.PatientID
    assert back.SeriesDescription.startswith("DEMO MODEL - NOT FOR CLINICAL USE")
    pixels = back.pixel_array
    assert pixels.shape == (source_ds.Rows, source_ds.Columns, 3)
    red, _, blue = (int(v) for v in pixels[row, column])
    assert red > blue + 60, pixels[row, column]  # the peak is painted hot
    r, g, b = (int(v) for v in pixels[-5, -5])
    assert r == g == b  # far from the heat the radiograph stays grey
    text = pixels[: pixels.shape[0] // 8, : pixels.shape[1] // 2]
    assert (text >= 250).all(axis=-1).sum() > 200  # burned-in white text


@pytest.mark.unit
def test_a_heat_map_off_the_image_grid_is_refused(tmp_path) -> None:
    path = tmp_path / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=64, columns=64)).save_as(path, enforce_file_format=True)
    result = AlgorithmResult("x", "1", demo=False, heatmaps=[HeatMap("h", np.zeros((8, 8)))])
    provenance = Provenance("x", "1", Weights(None, None, False))
    with pytest.raises(WriteError, match="not on the image grid"):
        heat_map_capture(result, {"series": SeriesInput("1", (path,))}, provenance, series_number=1)


@pytest.mark.unit
def test_an_image_too_small_for_its_text_is_a_write_error_naming_its_size(tmp_path) -> None:
    """pydicom's dicomdirtests hold 16 x 16 CRs: no size of text fits, and a capture without
    it would not say what it shows; the job fails at once, in words (not a retried ValueError)."""
    path = tmp_path / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=16, columns=16)).save_as(path, enforce_file_format=True)
    result = AlgorithmResult(
        "x",
        "1",
        demo=True,
        classifications=[Classification("Pneumonia", 0.2, 0.57)],
        heatmaps=[HeatMap("h", np.zeros((16, 16)))],
    )
    provenance = Provenance("x", "1", Weights(None, None, True))
    with pytest.raises(WriteError, match="16 x 16 image cannot hold 3 lines"):
        heat_map_capture(result, {"series": SeriesInput("1", (path,))}, provenance, series_number=1)


@pytest.mark.integration
def test_a_radiograph_without_body_part_or_orientation_gets_a_valid_capture(tmp_path) -> None:
    """No Body Part Examined: validators must assume a paired organ, so Laterality (Type 2C)
    is written empty; no Patient Orientation: the capture's is empty, not an invented L\\F;
    and the Type 2 patient and study attributes real CRs lack are written empty."""
    ds = cxr_dataset(CxrPhantomSpec(rows=64, columns=64))
    for keyword in ("BodyPartExamined", "PatientOrientation", "PatientID", "StudyID"):
        delattr(ds, keyword)
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    capture, _ = capture_of(path, 0.3)
    out = tmp_path / "sc.dcm"
    capture.save_as(out)
    # Empty as the source left them: only a DICOMDIR would miss the Study ID, and an empty
    # Laterality is what dciodvfy asks for a side that is unknown.
    known = ("needed to build DICOMDIR", "Study ID", "<Laterality>")
    assert dciodvfy(out, from_source=known) == []
    back = dcmread(out)
    assert back.Laterality == "" and back.PatientOrientation == ""
    assert "BodyPartExamined" not in back and back.PatientID == ""
    ds = cxr_dataset(CxrPhantomSpec(rows=64, columns=64))  # with both: kept as they were
    ds.save_as(path, enforce_file_format=True)
    capture, _ = capture_of(path, 0.3)
    assert (capture.BodyPartExamined, list(capture.PatientOrientation)) == ("CHEST", ["L", "F"])
    assert "Laterality" not in capture


@pytest.mark.integration
@pytest.mark.parametrize(
    ("part", "image_laterality", "expected"),
    [
        ("HAND", None, {"Laterality": ""}),  # paired, side unknown: empty, not guessed
        ("HAND", "R", {"ImageLaterality": "R"}),  # the source's side, as the source said it
        ("CHEST", None, {}),  # unpaired: no side at all
    ],
)
def test_the_side_of_a_paired_body_part_is_the_sources_or_unknown(
    tmp_path, part, image_laterality, expected
) -> None:
    ds = cxr_dataset(CxrPhantomSpec(rows=64, columns=64))
    ds.BodyPartExamined = part
    if image_laterality:
        ds.ImageLaterality = image_laterality
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    capture, _ = capture_of(path, 0.3)
    out = tmp_path / "sc.dcm"
    capture.save_as(out)
    dciodvfy(out, from_source=("<Laterality>",))  # an unknown side is a warning, not an error
    sides = {k: capture[k].value for k in ("Laterality", "ImageLaterality") if k in capture}
    assert sides == expected
