"""FHIR R4 notifications: the DiagnosticReport and its Observations, valid against the
official FHIR R4 JSON schema, written by conditional update to a real HTTP FHIR receiver so
that a resend never duplicates; through a node, an outage delivers once after it."""

from __future__ import annotations

from functools import partial

import pytest

from dicom_node.config import FhirDestination
from dicom_node.errors import DestinationRefused, DestinationUnavailable
from dicom_node.notify_fhir import DICOM_UID, resources, send_fhir
from tests.support.fhir import FhirReceiver, r4_errors
from tests.support.node import wait_until
from tests.support.notify import (
    cxr_report_for,
    delivery_attempts,
    delivery_row,
    notify_node,
    send_ct,
    wait_for_delivery,
)

cxr_report = partial(cxr_report_for, job_id=9, destination="ehr")


@pytest.mark.unit
@pytest.mark.parametrize(("probability", "demo"), [(0.93, True), (0.05, False)])
def test_resources_are_valid_r4_and_say_the_result(tmp_path, probability, demo) -> None:
    report = cxr_report(tmp_path, probability, demo=demo)
    *observations, diagnostic = resources(FhirDestination(url="http://ehr/fhir"), report)
    for resource in [*observations, diagnostic]:
        assert r4_errors(resource) == []
    (observation,) = observations
    positive = probability >= 0.5
    assert observation["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "233604007",
        "display": "Pneumonia",
    }
    assert observation["interpretation"][0]["coding"][0]["code"] == ("A" if positive else "N")
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == (
        "52101004" if positive else "272519000"
    )
    quantity = observation["component"][0]["valueQuantity"]
    assert quantity["value"] == pytest.approx(probability)
    assert quantity["system"] == "http://unitsofmeasure.org"
    assert ("note" in observation) is demo
    study = {"system": DICOM_UID, "value": f"urn:oid:{report.study.study_uid}"}
    assert diagnostic["imagingStudy"][0]["identifier"] == study
    assert observation["derivedFrom"][0]["identifier"] == study
    assert diagnostic["basedOn"][0]["identifier"]["value"] == "ACC-0042"
    assert diagnostic["subject"]["identifier"]["value"] == "PAT-7"
    assert diagnostic["result"] == [{"reference": "Observation/1"}]
    (form,) = diagnostic["presentedForm"]
    assert form["contentType"] == "application/dicom"
    assert report.objects[0].sop_instance_uid in form["url"]
    assert ("DEMO MODEL" in diagnostic["conclusion"]) is demo


@pytest.mark.unit
def test_the_schema_check_can_fail() -> None:
    assert r4_errors({"resourceType": "Observation", "status": "done", "code": {}})


@pytest.mark.integration
def test_a_resend_updates_and_never_duplicates(tmp_path) -> None:
    receiver = FhirReceiver().start()
    try:
        target = FhirDestination(url=receiver.url)
        report = cxr_report(tmp_path, 0.9)
        send_fhir(target, report, timeout_s=5)
        send_fhir(target, report, timeout_s=5)  # the link dropped after the server took it
        assert receiver.invalid == []
        assert len(receiver.all("Observation")) == len(receiver.all("DiagnosticReport")) == 1
        assert set(receiver.puts.values()) == {2}
        (diagnostic,) = receiver.all("DiagnosticReport")
        (observation,) = receiver.all("Observation")
        assert diagnostic["result"] == [{"reference": f"Observation/{observation['id']}"}]

        receiver.status = 503
        with pytest.raises(DestinationUnavailable, match="HTTP 503"):
            send_fhir(target, report, timeout_s=5)
        receiver.status = 412  # several resources match: a person must sort it out
        with pytest.raises(DestinationRefused, match="HTTP 412"):
            send_fhir(target, report, timeout_s=5)
    finally:
        receiver.stop()
    with pytest.raises(DestinationUnavailable, match="ConnectionError"):
        send_fhir(target, report, timeout_s=5)


@pytest.mark.integration
@pytest.mark.slow
def test_an_outage_then_exactly_once_through_a_node(make_node, tmp_path) -> None:
    receiver = FhirReceiver()  # down at first
    node = notify_node(make_node, {"type": "fhir", "url": receiver.url})
    send_ct(node, tmp_path / "ct")
    wait_until(
        lambda: (row := delivery_row(node)) is not None and row["attempts"] >= 2,
        120,
        "failed attempts while the server is down",
        node.log(),
    )
    receiver.start()
    try:
        wait_for_delivery(node, "sent", 60, "sent")
        assert receiver.invalid == []
        (diagnostic,) = receiver.all("DiagnosticReport")
        observations = receiver.all("Observation")
        assert observations and all(
            o["interpretation"][0]["coding"][0]["code"] for o in observations
        )
        assert any(o["interpretation"][0]["coding"][0]["code"] == "A" for o in observations)
        assert len(diagnostic["result"]) == len(observations)
        assert set(receiver.puts.values()) == {1}
        assert node.stop() == 0
        audited = delivery_attempts(node.data_dir / "audit" / "audit.jsonl", receiver.url)
        outcomes = [m["EventIdentification"]["EventOutcomeIndicator"] for m in audited]
        assert outcomes[-1] == 0 and outcomes.count(0) == 1 and set(outcomes[:-1]) == {4}
    finally:
        receiver.stop()


@pytest.mark.integration
def test_a_value_fhir_cannot_carry_is_refused_before_sending(tmp_path) -> None:
    from dataclasses import replace

    from dicom_node.notify import Code

    receiver = FhirReceiver().start()
    try:
        report = cxr_report(tmp_path, 0.9)
        odd = replace(report.findings[0], finding=Code("99X", "two  spaces", "Odd"))
        with pytest.raises(DestinationRefused, match="FHIR resources"):
            send_fhir(FhirDestination(url=receiver.url), replace(report, findings=(odd,)), 5)
        assert receiver.puts == {}
    finally:
        receiver.stop()
