"""The dashboard in a real browser (Debian's Chromium driven by playwright-core): an operator
sees the study just sent with its routing and job timeline, the DEMO weights, a destination in
trouble with its dead letter, and the Retry button sends the delivery again."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.phantoms import cxr_dataset
from dicom_node.testing import free_port
from tests.support.http import metrics
from tests.support.notify import WebhookReceiver
from tests.support.viewer import browser_ready, check_dashboard

pytestmark = pytest.mark.browser

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artefacts"
SECRET = "a-webhook-secret-for-the-dashboard"

__all__ = ["browser_ready"]  # the fixture this module uses


def test_dashboard_shows_the_study_and_retries_a_dead_letter(make_node, tmp_path, browser_ready):
    cxr = tmp_path / "cxr.dcm"
    cxr_dataset().save_as(cxr, enforce_file_format=True)
    study_uid = str(dcmread(cxr, stop_before_pixels=True).StudyInstanceUID)
    closed = free_port()  # nothing listens there: the PACS is "down"
    hook = WebhookReceiver(SECRET).start()  # a clinical system that is told of the result
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        destinations={
            "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": closed},
            "ward": {"type": "webhook", "url": hook.url, "secret": SECRET},
        },
        routing={"destinations": ["pacs", "ward"]},
        delivery={"max_attempts": 1},
    )
    try:
        assert node.storescu(files=[cxr], aet="MODALITY").returncode == 0
        dead = "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'"
        assert node.wait_for(dead, 1, timeout_s=120) == 1, node.log()
        sent = "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'"
        assert node.wait_for(sent, 1, timeout_s=60) == 1, node.log()
    finally:
        hook.stop()

    report = check_dashboard(node.http_url, study_uid, ARTEFACTS)

    assert report["pageErrors"] == [] and report["consoleErrors"] == []
    assert report["studyListed"]
    assert "DEMO WEIGHTS" in report["banner"] and "pneumonia-cxr" in report["banner"]
    cxr_row = next(r for r in report["algorithms"] if r.startswith("pneumonia-cxr"))
    assert "DEMO" in cxr_row and "cpu" in cxr_row
    pacs, ward = report["destinations"]
    assert pacs.startswith("pacsdicom") and f"PACS@127.0.0.1:{closed}" in pacs
    assert "dead letters" in pacs
    assert ward.startswith("wardwebhook")
    # What was told to whom: the webhook's delivery reads as notified, the PACS's as dead.
    assert sorted(d[: d.index("1")] for d in report["deliveries"]) == [
        "pacsdicomdead",
        "wardwebhooknotified",
    ]
    (letter,) = report["attention"]
    assert "pacs" in letter and "Retry" in letter
    assert report["ready"] == "ready" and report["mode"] == "embedded"
    steps = [s.split(" +")[0] for s in report["steps"]]
    assert steps == [
        "received",
        "complete",
        "routed",
        "started",
        "inference",
        "written",
        "delivered",
    ]
    assert any("pneumonia-cxr" in d for d in report["decisions"])
    # A role rule lists every series of the study with the role it got or why not.
    (brain,) = [d for d in report["decisions"] if d.startswith("brain-tumour-mr: missing")]
    assert "PHANTOM CHEST PA—fits no role: modality CR is not MR" in brain
    assert report["notice"].endswith("1 delivery(ies) queued again")
    assert (ARTEFACTS / "dashboard.png").stat().st_size > 10_000

    # The retry really went out: a second attempt at the closed port, a dead letter again.
    attempts = (("destination", "pacs"),)
    # The POST has answered: the delivery is pending with 'replayed: ...' until the deliverer
    # tries again and it is dead with a fresh error.
    again = (
        "SELECT COUNT(*) FROM deliveries WHERE state = 'dead' AND attempts = 1"
        " AND last_error NOT LIKE 'replayed:%'"
    )
    assert node.wait_for(again, 1) == 1, node.log()
    assert metrics(node.http_url)[("dicom_node_delivery_attempts_total", attempts)] == 2
    assert metrics(node.http_url)[("dicom_node_dead_letters_total", attempts)] == 2
