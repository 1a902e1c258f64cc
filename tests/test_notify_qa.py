"""`dicom-node qa` with a notification destination on the phantom's route: a receiver that
takes the result passes, one that refuses it fails with the node's reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dicom_node.qa.peer import QA_AE_TITLE
from dicom_node.testing import free_port
from tests.support.notify import WebhookReceiver

SECRET = "qa-secret-qa-secret-qa"


def qa_with_webhook(make_node, receiver: WebhookReceiver) -> dict:
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        peers={QA_AE_TITLE: {"host": "127.0.0.1", "port": free_port()}},
        destinations={"hook": {"type": "webhook", "url": receiver.url, "secret": SECRET}},
        routing={"destinations": ["sender", "hook"]},
        delivery={"backoff_initial_s": 0.3, "backoff_max_s": 1.0, "poll_s": 0.1},
    )
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "qa", "--config", str(node.config_path),
         "--algorithms", "pneumonia-cxr", "--timeout", "120", "--json"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    report = json.loads(done.stdout)
    report["returncode"] = done.returncode
    return report


def notified(report: dict) -> dict:
    (check,) = [c for c in report["checks"] if c["name"] == "notified hook"]
    return check


@pytest.mark.integration
@pytest.mark.slow
def test_qa_passes_a_notification_the_receiver_took(make_node) -> None:
    receiver = WebhookReceiver(SECRET).start()
    try:
        report = qa_with_webhook(make_node, receiver)
        check = notified(report)
        assert check["study"] == "pneumonia-cxr" and check["outcome"] == "PASS", report
        assert receiver.url in check["detail"]
        assert report["returncode"] == 0, report
        (doc,) = receiver.documents()
        assert doc["algorithm"]["name"] == "pneumonia-cxr" and doc["algorithm"]["demo"] is True
    finally:
        receiver.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_qa_fails_a_notification_the_receiver_refused(make_node) -> None:
    receiver = WebhookReceiver(SECRET).start()
    receiver.status = 403
    try:
        report = qa_with_webhook(make_node, receiver)
        check = notified(report)
        assert check["outcome"] == "FAIL" and "HTTP 403" in check["detail"], report
        assert "dead letter" in check["detail"]
        assert report["returncode"] == 1 and report["verdict"] == "FAIL"
    finally:
        receiver.stop()
