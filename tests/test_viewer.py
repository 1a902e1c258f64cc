"""A real viewer shows the node's results: OHIF (from Orthanc over DICOMweb) loads the SEG
with its segments and colours the nodule where it is, and draws the SR's measurements with
their labels, the nodule's circle on the nodule."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dicom_node.testing import Orthanc
from tests.support.cases import PROVENANCE, ct_case
from tests.support.viewer import VIEWER_TOOLS, ViewerServer, missing, run_check

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artefacts"


@pytest.fixture(scope="module")
def viewer_ready() -> None:
    lacking = missing()
    if lacking:
        message = f"viewer test needs: {', '.join(lacking)} (make viewer-tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("pixel_spacing_mm", [(0.9, 0.6), (0.7, 0.7)], ids=["non-square", "square"])
def test_ohif_shows_the_seg_and_the_sr_on_the_lesion(
    tmp_path, viewer_ready, pixel_spacing_mm
) -> None:
    import cv2

    from dicom_node.write import measurement_report, segmentation

    spec, paths, series, result = ct_case(tmp_path, "axial", pixel_spacing_mm=pixel_spacing_mm)
    inputs = {"series": series}
    seg = segmentation(result, inputs, PROVENANCE, series_number=901)
    sr = measurement_report(result, inputs, PROVENANCE, series_number=902, segmentation=seg)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    orthanc = Orthanc(tmp_path).start()
    server = None
    artefacts = ARTEFACTS / ("square" if pixel_spacing_mm[0] == pixel_spacing_mm[1] else "")
    try:
        for path in [*paths, tmp_path / "seg.dcm", tmp_path / "sr.dcm"]:
            orthanc.upload(path)
        server = ViewerServer(orthanc).start()
        artefacts.mkdir(parents=True, exist_ok=True)
        (nodule,) = spec.nodules
        report = run_check(
            VIEWER_TOOLS / "check_ohif.mjs",
            server.url,
            seg.StudyInstanceUID,
            artefacts,
            list(nodule.center_lps_mm),
        )
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()
    assert report["errors"] == []
    (shown,) = report["segmentations"]
    assert shown["segments"] == ["Nodule 1", "Body"]
    # On the screenshot, the nodule centre is painted with the nodule segment's colour: red
    # dominates where the grey CT would have R = G = B.
    view = report["view"]
    assert view["distanceToPlane"] < nodule.diameter_mm / 2
    picture = cv2.imread(str(artefacts / "ohif-seg.png"))[..., ::-1].astype(int)
    x, y = round(view["x"]), round(view["y"])
    patch = picture[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)
    assert patch[0] > patch[2] + 40, f"no nodule colour at the nodule ({patch})"
    assert np.ptp(picture[y - 2 : y + 3, x - 2 : x + 3]) < 255

    # The SR: one measurement per lesion (its planar and volumetric groups merged by their
    # shared tracking UID), each on its image and drawn with its labels.
    (loaded,) = report["sr"]
    nodule_uid, body_uid = (s.TrackingUID for s in seg.SegmentSequence)
    measurements = {m["trackingUid"]: m for m in loaded["measurements"]}
    assert set(measurements) == {nodule_uid, body_uid}
    assert all(m["onImage"] and m["graphicType"] == "POLYLINE" for m in measurements.values())
    diameter, probability, volume = measurements[nodule_uid]["labels"][:3]
    assert (diameter, probability) == ("Diameter: 9.00 mm", "Probability: 0.93 1")
    assert volume.startswith("Volume: ") and volume.endswith(" mm3")
    assert float(volume.split()[1]) == pytest.approx(nodule_volume_mm3(result, series), abs=0.01)
    assert measurements[body_uid]["labels"][0].startswith("Area: ")
    assert measurements[body_uid]["labels"][1].endswith(" mL")
    drawn = {m["trackingUid"]: m for m in report["drawn"]}
    assert set(drawn) == set(measurements)
    circle = np.array(drawn[nodule_uid]["points"])
    assert drawn[nodule_uid]["lines"][0] == "Diameter: 9.00 mm"
    if pixel_spacing_mm[0] != pixel_spacing_mm[1]:
        # OHIF 3.13 lays 2D SR coordinates out with row and column spacing swapped
        # (cornerstone3D #2758: imageToWorldCoords), so on non-square pixels it draws the
        # circle stretched and off the nodule; what we write is checked in test_write_sr.
        return
    # The circle OHIF draws is round, 9 mm across, and centred on the nodule.
    sr_view = report["srView"]
    centre = circle[:-1].mean(axis=0)
    radii = np.linalg.norm(circle[:-1] - centre, axis=1)
    pixels_per_mm = radii.mean() / (nodule.diameter_mm / 2)
    assert np.ptp(radii) < 0.05 * radii.mean(), "the circle is drawn squashed"
    off_mm = np.linalg.norm(centre - [sr_view["x"], sr_view["y"]]) / pixels_per_mm
    assert off_mm < pixel_spacing_mm[0], f"the circle is {off_mm:.2f} mm off the nodule"


def nodule_volume_mm3(result, series) -> float:
    return float(result.masks[0].array.sum()) * float(series.volume().voxel_volume)
