"""The audit trail: PS3.15 A.5 audit messages for a real node's security-relevant events."""

from __future__ import annotations

import stat

import pytest
from pydicom import dcmread

from dicom_node.audit import AuditTrail
from dicom_node.config import AuditConfig
from dicom_node.events import (
    AssociationAccepted,
    DataDeleted,
    DeliveryAttempted,
    InstanceReceived,
    StudyRef,
)
from dicom_node.phantoms import cxr_dataset
from tests.support.audit import event_id, event_type, objects, read_trail


@pytest.mark.integration
def test_a_study_through_the_node_is_audited_end_to_end(make_node, tmp_path):
    cxr = tmp_path / "cxr.dcm"
    cxr_dataset().save_as(cxr, enforce_file_format=True)
    source = dcmread(cxr, stop_before_pixels=True)
    outbox = tmp_path / "outbox"
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        destinations={"share": {"type": "folder", "path": str(outbox)}},
        routing={"destinations": ["share"]},
        retention={"instances_hours": 0, "results_hours": 0, "check_every_s": 0.2},
    )
    assert node.storescu(files=[cxr], aet="MODALITY").returncode == 0
    assert node.storescu(files=[cxr], aet="MODALITY", aec="SOMEONE-ELSE").returncode != 0
    assert node.wait_for("SELECT COUNT(*) FROM purges", 2, timeout_s=120) == 2, node.log()
    assert node.stop() == 0

    trail = node.data_dir / "audit" / "audit.jsonl"
    assert stat.S_IMODE(trail.stat().st_mode) == 0o600  # it names patients
    messages = read_trail(trail)
    kinds = [(event_id(m), event_type(m)) for m in messages]
    assert kinds[:2] == [
        ("Application Activity", "Application Start"),
        ("Security Alert", "Software Configuration"),
    ]
    assert kinds[-1] == ("Application Activity", "Application Stop")
    assert objects(messages[1])["URI"] == str(node.config_path.resolve())

    auth = [m for m in messages if event_type(m) == "Node Authentication"]
    assert [m["EventIdentification"]["EventOutcomeIndicator"] for m in auth] == [0, 4]
    requestor = auth[1]["ActiveParticipant"][0]
    assert requestor["AlternativeUserID"] == "AETITLES=MODALITY"
    assert requestor["NetworkAccessPointID"] == "127.0.0.1"
    assert requestor["NetworkAccessPointTypeCode"] == "2"  # an IP address
    assert "SOMEONE-ELSE" in auth[1]["EventIdentification"]["EventOutcomeDescription"]

    study = {"Study Instance UID": source.StudyInstanceUID, "Patient Number": source.PatientID}
    transfers = [m for m in messages if event_id(m) == "DICOM Instances Transferred"]
    received, sent = (
        [m for m in transfers if m["EventIdentification"]["EventActionCode"] == action]
        for action in ("C", "R")
    )
    assert len(received) == 1 and objects(received[0]) == study
    roles = [p["RoleIDCode"]["originalText"] for p in received[0]["ActiveParticipant"]]
    assert roles == ["Source Role ID", "Destination Role ID"]
    assert received[0]["ActiveParticipant"][0]["UserIsRequestor"] is True
    assert len(sent) == 1 and objects(sent[0]) == study
    assert sent[0]["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert sent[0]["ActiveParticipant"][1]["UserID"] == str(outbox)

    deleted = [m for m in messages if event_id(m) == "DICOM Study Deleted"]
    assert len(deleted) == 2  # the received instances, and the results
    assert all(m["EventIdentification"]["EventActionCode"] == "D" for m in deleted)
    assert all(objects(m) == study for m in deleted)
    for m in messages:
        assert m["AuditSourceIdentification"]["AuditSourceTypeCode"] == "4"
        assert m["EventIdentification"]["EventDateTime"].endswith("+00:00")

    # The log names no patient at INFO and above; the audit trail is where that belongs.
    assert source.PatientID not in node.log()


@pytest.mark.unit
def test_the_trail_rotates_without_losing_a_message(tmp_path):
    config = AuditConfig(path=tmp_path / "a" / "audit.jsonl", max_bytes=16384, backup_count=100)
    trail = AuditTrail(config, tmp_path, "DICOMNODE")
    study = (StudyRef("1.2.3", "PID-1", 3),)
    emitted = 0
    for n in range(150):
        trail.emit(AssociationAccepted(f"AE{n}", "10.0.0.1", "DICOMNODE"))
        trail.emit(DeliveryAttempted("pacs", "PACS@10.0.0.2:104", study, ok=n % 2 == 0))
        trail.emit(DataDeleted("received instances", study, 3, 100))
        trail.emit(InstanceReceived(True, 10))  # counted in metrics, not audited
        emitted += 3
    trail.close()
    rotated = sorted(config.path.parent.glob("audit.jsonl.*"))
    assert len(rotated) > 5
    assert all(p.stat().st_size <= 16384 for p in [config.path, *rotated])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in [config.path, *rotated])
    messages = read_trail(config.path)
    assert len(messages) == emitted
    accepted = [m for m in messages if event_type(m) == "Node Authentication"]
    assert [m["ActiveParticipant"][0]["UserID"] for m in accepted] == [f"AE{n}" for n in range(150)]
    outcomes = [
        m["EventIdentification"]["EventOutcomeIndicator"]
        for m in messages
        if event_id(m) == "DICOM Instances Transferred"
    ]
    assert outcomes == [0 if n % 2 == 0 else 4 for n in range(150)]


@pytest.mark.unit
def test_old_rotations_are_dropped_beyond_backup_count(tmp_path):
    config = AuditConfig(path=tmp_path / "audit.jsonl", max_bytes=4096, backup_count=2)
    trail = AuditTrail(config, tmp_path, "DICOMNODE")
    for n in range(200):
        trail.emit(AssociationAccepted(f"AE{n}", "10.0.0.1", "DICOMNODE"))
    trail.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]
    newest = read_trail(config.path)[-1]
    assert newest["ActiveParticipant"][0]["UserID"] == "AE199"
