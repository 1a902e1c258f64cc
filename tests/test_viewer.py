"""A real viewer shows the node's results: OHIF (from Orthanc over DICOMweb) loads the SEG
with its segments, colours the nodule where it is, and loads the SR's measurement region."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.test_write_seg import PROVENANCE
from tests.test_write_sr import ct_case
from tests.viewer import VIEWER_TOOLS, Orthanc, ViewerServer, missing, run_check

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artefacts"


@pytest.fixture(scope="module")
def viewer_ready() -> None:
    lacking = missing()
    if lacking:
        message = f"viewer test needs: {', '.join(lacking)} (make viewer-tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_ohif_shows_the_seg_on_the_lesion_and_loads_the_sr(tmp_path, viewer_ready) -> None:
    import cv2

    from dicom_node.write import measurement_report, segmentation

    spec, paths, series, result = ct_case(tmp_path, "axial")
    inputs = {"series": series}
    seg = segmentation(result, inputs, PROVENANCE, series_number=901)
    sr = measurement_report(result, inputs, PROVENANCE, series_number=902, segmentation=seg)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    orthanc = Orthanc(tmp_path).start()
    server = None
    try:
        for path in [*paths, tmp_path / "seg.dcm", tmp_path / "sr.dcm"]:
            orthanc.upload(path)
        server = ViewerServer(orthanc).start()
        ARTEFACTS.mkdir(exist_ok=True)
        (nodule,) = spec.nodules
        report = run_check(
            VIEWER_TOOLS / "check_ohif.mjs",
            server.url,
            seg.StudyInstanceUID,
            ARTEFACTS,
            list(nodule.center_lps_mm),
        )
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()
    assert report["errors"] == []
    (shown,) = report["segmentations"]
    assert shown["segments"] == ["Nodule 1", "Body"]
    # The SR's finding is loaded with its 2D region (OHIF draws 2D SCOORDs).
    (loaded_sr,) = report["sr"]
    assert loaded_sr["loaded"] and "POLYLINE" in loaded_sr["graphicTypes"]
    # On the screenshot, the nodule centre is painted with the nodule segment's colour: red
    # dominates where the grey CT would have R = G = B.
    view = report["view"]
    assert view["distanceToPlane"] < nodule.diameter_mm / 2
    picture = cv2.imread(str(ARTEFACTS / "ohif-seg.png"))[..., ::-1].astype(int)
    x, y = round(view["x"]), round(view["y"])
    patch = picture[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)
    assert patch[0] > patch[2] + 40, f"no nodule colour at the nodule ({patch})"
    assert np.ptp(picture[y - 2 : y + 3, x - 2 : x + 3]) < 255
