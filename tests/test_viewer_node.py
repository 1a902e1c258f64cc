"""A real viewer reads the node itself: OHIF, with the compose demo's configuration, takes a
CT phantom and the node's own SEG and SR of it from the node's DICOMweb origin server
(QIDO-RS, WADO-RS metadata, frames and bulk data), no PACS between them. The CT is sent by
C-STORE and routed to the lung-nodule detector (demo weights) by the default rules, so what
the viewer shows is what the node made."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from dicom_node.phantoms import write_ct_series
from dicom_node.scu import send
from tests.support.cases import PHANTOMS
from tests.support.dicomweb import wait_for_seg_and_sr
from tests.support.node import NodeProcess
from tests.support.viewer import VIEWER_TOOLS, ViewerServer, missing, run_check

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artefacts" / "node"
TOKEN = "viewer-node-token"
CT = PHANTOMS["axial"]  # one nodule the demo weights find, on square pixels


@pytest.fixture(scope="module")
def viewer_ready() -> None:
    lacking = [m for m in missing() if "orthanc" not in m.lower()]  # Orthanc is not needed
    if lacking:
        message = f"viewer test needs: {', '.join(lacking)} (make viewer-tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("syntax", [None, JPEGLSLossless], ids=["native", "jpeg-ls"])
def test_ohif_shows_the_node_seg_and_sr_read_from_the_node(tmp_path, viewer_ready, syntax) -> None:
    """Native: the frames go as application/octet-stream. JPEG-LS: the CT is sent compressed
    and OHIF asks transfer-syntax=*, so it gets each frame's own image/jls bit stream."""
    import cv2

    artefacts = ARTEFACTS / ("native" if syntax is None else "jpeg-ls")
    ct = write_ct_series(tmp_path / "ct", CT)
    if syntax is not None:
        for path in ct:
            ds = dcmread(path)
            ds.compress(syntax)
            ds.save_as(path, enforce_file_format=True)
    study_uid = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    (tmp_path / "node").mkdir()
    node = NodeProcess(
        tmp_path / "node",
        {
            "assembly": {"series_quiet_seconds": 1, "study_quiet_seconds": 1},
            "http": {"token": TOKEN},
        },
    ).start()
    server = None
    try:
        assert send(ct, "127.0.0.1", node.port).ok, node.log()
        wait_for_seg_and_sr(node)
        stored = {r[0] for r in node.query("SELECT transfer_syntax FROM instances")}
        assert stored == {str(syntax or "1.2.840.10008.1.2.1")}  # kept as sent, compressed
        seg = dcmread(node.outputs()["SEG"])
        server = ViewerServer(upstream=node.http_url, token=TOKEN).start()
        artefacts.mkdir(parents=True, exist_ok=True)
        (nodule,) = CT.nodules
        report = run_check(
            VIEWER_TOOLS / "check_ohif.mjs",
            server.url,
            study_uid,
            artefacts,
            list(nodule.center_lps_mm),
        )
    finally:
        if server is not None:
            server.stop()
        node.stop()
    assert report["errors"] == []
    # The SEG loads with the segments the node wrote, and colours the nodule where it is.
    (shown,) = report["segmentations"]
    assert shown["segments"] == [str(s.SegmentLabel) for s in seg.SegmentSequence]
    view = report["view"]
    assert view["distanceToPlane"] < nodule.diameter_mm / 2
    picture = cv2.imread(str(artefacts / "ohif-seg.png"))[..., ::-1].astype(int)
    x, y = round(view["x"]), round(view["y"])
    patch = picture[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)
    assert patch[0] > patch[2] + 40, f"no nodule colour at the nodule ({patch})"
    # The SR: its measurements are on their images and drawn, one per SEG segment.
    (loaded,) = report["sr"]
    assert loaded["measurements"], "the SR showed no measurements"
    assert all(m["onImage"] for m in loaded["measurements"])
    tracked = {str(s.TrackingUID) for s in seg.SegmentSequence if "TrackingUID" in s}
    assert {m["trackingUid"] for m in loaded["measurements"]} <= tracked | {None}
    assert {m["trackingUid"] for m in report["drawn"]} == {
        m["trackingUid"] for m in loaded["measurements"]
    }
    # The nodule's measurement: drawn as a round outline centred on the phantom's nodule, its
    # label the diameter the node measured.
    (outline,) = [m for m in report["drawn"] if m["lines"][:1] and "Diameter" in m["lines"][0]]
    diameter_mm = float(outline["lines"][0].split()[1])
    assert diameter_mm == pytest.approx(nodule.diameter_mm, abs=2)
    circle = np.array(outline["points"])
    centre = circle[:-1].mean(axis=0)
    radii = np.linalg.norm(circle[:-1] - centre, axis=1)
    assert np.ptp(radii) < 0.05 * radii.mean(), "the circle is drawn squashed"
    pixels_per_mm = radii.mean() / (diameter_mm / 2)
    sr_view = report["srView"]
    off_mm = np.linalg.norm(centre - [sr_view["x"], sr_view["y"]]) / pixels_per_mm
    assert off_mm < 2 * CT.pixel_spacing_mm[0], f"the circle is {off_mm:.2f} mm off the nodule"
