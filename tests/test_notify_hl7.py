"""HL7 v2.5.1 ORU^R01 over MLLP to a receiver built on python-hl7's own MLLP server: the
message's content, ACK handling (AA sent, AR dead, AE retried then dead, silence retried),
and through a node: an outage delivers exactly once after it, a dead letter is replayed."""

from __future__ import annotations

import time
from functools import partial

import hl7
import pytest

from dicom_node.config import Hl7Destination, NotifyRule
from dicom_node.errors import DestinationRefused, DestinationUnavailable
from dicom_node.notify_hl7 import control_id, message, send_hl7
from tests.support.mllp import MllpReceiver
from tests.support.node import wait_until
from tests.support.notify import (
    cxr_report_for,
    delivery_attempts,
    delivery_row,
    notify_node,
    send_ct,
    wait_for_delivery,
)


def target(port: int, **extra) -> Hl7Destination:
    settings = {"receiving_application": "RIS", "receiving_facility": "HOSP", **extra}
    return Hl7Destination(host="127.0.0.1", port=port, **settings)


cxr_report = partial(cxr_report_for, job_id=5, destination="ris")


@pytest.mark.unit
def test_the_oru_carries_identity_findings_flags_and_demo(tmp_path) -> None:
    report = cxr_report(tmp_path, 0.87, rule=NotifyRule(positive_priority="stat"))
    msg = hl7.parse(str(message(target(2575), report)))
    msh = msg.segment("MSH")
    assert str(msh(3)) == "DICOMNODE" and str(msh(5)) == "RIS" and str(msh(6)) == "HOSP"
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert str(msh(10)) == control_id(report) and len(str(msh(10))) == 20
    pid = msg.segment("PID")
    assert str(pid(3)) == "PAT-7" and str(pid(5)) == "Doe^Jane^^^"
    obr = msg.segment("OBR")
    assert str(obr(2)) == str(obr(3)) == str(obr(18)) == "ACC-0042"
    assert str(obr(25)) == "F"
    assert str(msg.segment("NTE")(3)) == "DEMO MODEL - NOT FOR CLINICAL USE"
    assert str(msg.segment("TQ1")(9)) == "S"  # raised for the positive result
    obx = msg.segments("OBX")
    finding = obx[0]
    assert str(finding(3)) == "233604007^Pneumonia^SCT" and str(finding(8)) == "A"
    assert "Pneumonia" in str(finding(5)) and "present" in str(finding(5))
    assert str(obx[1](2)) == "NM" and float(str(obx[1](5))) == pytest.approx(0.87)
    assert str(obx[2](5)) == report.study.study_uid
    assert [str(o(11)) for o in obx] == ["F"] * len(obx)
    # A resend is the same message, byte for byte.
    assert str(message(target(2575), report)) == str(message(target(2575), report))


@pytest.mark.unit
def test_a_negative_result_is_flagged_normal_without_demo(tmp_path) -> None:
    msg = message(target(2575), cxr_report(tmp_path, 0.1, demo=False))
    assert str(msg.segments("OBX")[0](8)) == "N"
    assert "absent" in str(msg.segments("OBX")[0](5))
    with pytest.raises(KeyError):
        msg.segment("NTE")
    assert str(msg.segment("TQ1")(9)) == "R"


@pytest.mark.unit
def test_delimiters_in_values_are_escaped(tmp_path) -> None:
    report = cxr_report(tmp_path, 0.9)
    odd = report.study.__class__(**{**report.study.__dict__, "accession_number": "A|B^C&D"})
    msg = message(target(2575), report.__class__(**{**report.__dict__, "study": odd}))
    assert msg.unescape(str(msg.segment("OBR")(18))) == "A|B^C&D"


@pytest.mark.unit
def test_delimiters_in_configured_names_are_refused() -> None:
    with pytest.raises(ValueError, match="delimiters"):
        target(2575, receiving_facility="A^B")


@pytest.mark.integration
def test_ack_codes_decide_sent_retried_or_dead(tmp_path) -> None:
    receiver = MllpReceiver().start()
    try:
        report = cxr_report(tmp_path, 0.9)
        send_hl7(target(receiver.port), report, attempt=1)
        (got,) = receiver.accepted
        assert str(got.segment("MSH")(10)) == control_id(report)
        assert str(got.segment("PID")(3)) == "PAT-7"

        receiver.ack_code = "AR"
        with pytest.raises(DestinationRefused, match="rejected"):
            send_hl7(target(receiver.port), report, attempt=1)

        receiver.ack_code = "AE"
        with pytest.raises(DestinationUnavailable, match="application error"):
            send_hl7(target(receiver.port, max_application_errors=3), report, attempt=2)
        with pytest.raises(DestinationRefused, match="given up"):
            send_hl7(target(receiver.port, max_application_errors=3), report, attempt=3)

        receiver.ack_code = None  # silent
        with pytest.raises(DestinationUnavailable, match="no ACK"):
            send_hl7(target(receiver.port, ack_timeout_s=0.5), report, attempt=1)
        assert receiver.received == 5 and len(receiver.accepted) == 1
    finally:
        receiver.stop()
    with pytest.raises(DestinationUnavailable, match="ConnectionRefused"):
        send_hl7(target(receiver.port), report, attempt=1)


@pytest.mark.integration
@pytest.mark.slow
def test_an_outage_then_exactly_once_through_a_node(make_node, tmp_path) -> None:
    receiver = MllpReceiver()  # down at first
    destination = {
        "type": "hl7",
        "host": "127.0.0.1",
        "port": receiver.port,
        "receiving_application": "RIS",
        "ack_timeout_s": 2,
    }
    node = notify_node(make_node, destination)
    ct = send_ct(node, tmp_path / "ct")
    wait_until(
        lambda: (row := delivery_row(node)) is not None and row["attempts"] >= 2,
        120,
        "failed attempts while the receiver is down",
        node.log(),
    )
    receiver.start()
    try:
        wait_for_delivery(node, "sent", 60, "sent")
        time.sleep(1.0)
        assert list(receiver.control_ids.values()) == [1]
        (msg,) = receiver.accepted
        from pydicom import dcmread

        source = dcmread(ct[0], stop_before_pixels=True)
        assert str(msg.segment("PID")(3)) == str(source.PatientID)
        assert str(msg.segment("OBX")(8)) == "A"  # the example plugin finds something
        assert node.stop() == 0
        where = f"RIS@127.0.0.1:{receiver.port}"
        audited = delivery_attempts(node.data_dir / "audit" / "audit.jsonl", where)
        outcomes = [m["EventIdentification"]["EventOutcomeIndicator"] for m in audited]
        assert outcomes[-1] == 0 and outcomes.count(0) == 1 and set(outcomes[:-1]) == {4}
    finally:
        receiver.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_reject_is_a_dead_letter_that_the_api_replays(make_node, tmp_path) -> None:
    from tests.support.http import request

    receiver = MllpReceiver().start()
    receiver.ack_code = "AR"
    try:
        destination = {
            "type": "hl7",
            "host": "127.0.0.1",
            "port": receiver.port,
            "receiving_application": "RIS",
        }
        node = notify_node(make_node, destination)
        send_ct(node, tmp_path / "ct")
        wait_for_delivery(node, "dead", 120, "dead")
        assert delivery_row(node)["attempts"] == 1
        receiver.ack_code = "AA"
        status, _ = request(node.http_url + "/api/deliveries/retry-dead", method="POST")
        assert status == 200
        wait_for_delivery(node, "sent", 60, "sent after replay")
        assert list(receiver.control_ids.values()) == [1]
    finally:
        receiver.stop()


@pytest.mark.unit
@pytest.mark.parametrize(("probability", "demo"), [(0.9, True), (0.1, False)])
def test_the_oru_is_valid_v251_by_hl7apy(tmp_path, probability, demo) -> None:
    """hl7apy's HL7 v2.5.1 structures (chapter 7 ORU_R01: segment order, groups, datatypes)
    take the message python-hl7 built, strictly."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    er7 = str(message(target(2575), cxr_report(tmp_path, probability, demo=demo)))
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.name == "ORU_R01" and parsed.validate()
    result = parsed.oru_r01_patient_result
    assert [c.name for c in result.children] == ["ORU_R01_PATIENT", "ORU_R01_ORDER_OBSERVATION"]
    order = [c.name for c in result.oru_r01_order_observation.children]
    assert order[:3] == ["ORC", "OBR", "NTE"] if demo else order[:2] == ["ORC", "OBR"]
    assert "ORU_R01_TIMING_QTY" in order and order[-1] == "ORU_R01_OBSERVATION"
