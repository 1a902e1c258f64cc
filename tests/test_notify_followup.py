"""A lung nodule follow-up told to the clinicians: the change since the prior study and the
prior's measurements, told apart from the current ones, in all three protocols; a resolved
nodule is a negative finding."""

from __future__ import annotations

import hl7
import jsonschema
import pytest

from dicom_node.config import FhirDestination, Hl7Destination
from dicom_node.notify_fhir import resources
from dicom_node.notify_hl7 import message
from dicom_node.notify_webhook import document, schema
from tests.support.fhir import r4_errors
from tests.support.notify import ct_followup_results, report_of

INCREASE = {"scheme": "SCT", "value": "15454001", "meaning": "Increase in size"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    objects, source = ct_followup_results(tmp_path_factory.mktemp("followup"))
    return report_of(objects, source, job_id=4, destination="x", algorithm="lung-nodules-ct")


@pytest.mark.unit
def test_the_webhook_says_the_change_and_which_measurements_are_the_priors(report) -> None:
    doc = document(report)
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)
    grown, gone = doc["findings"]
    assert grown["positive"] is True and grown["change"] == INCREASE
    measured = {
        (m["concept"]["meaning"], m["qualifier"]): m["value"] for m in grown["measurements"]
    }
    assert measured[("Diameter", None)] == 8.0
    assert measured[("Diameter", "prior")] == 6.0
    assert measured[("Volume", "prior")] == 110.0
    assert measured[("Volume", "Fractional Change")] == pytest.approx(172.7)
    assert measured[("Volume doubling time", None)] == pytest.approx(69.1)
    assert gone["positive"] is False and gone["label"].startswith("Resolved")
    assert {m["qualifier"] for m in gone["measurements"]} == {"prior"}
    assert doc["positive"] is True


@pytest.mark.unit
def test_the_oru_and_the_fhir_resources_say_it_too(report) -> None:
    msg = hl7.parse(
        str(message(Hl7Destination(host="h", port=1, receiving_application="R"), report))
    )
    flagged = [o for o in msg.segments("OBX") if str(o(2)) == "ST" and str(o(8))]
    assert [str(o(8)) for o in flagged] == ["A", "N"]
    assert "increase in size" in str(flagged[0](5)) and "Diameter (prior) 6 mm" in str(
        flagged[0](5)
    )
    names = [str(o(3)).split("^")[1] for o in msg.segments("OBX") if str(o(2)) == "NM"]
    assert "Diameter (prior)" in names and "Volume (Fractional Change)" in names

    *observations, diagnostic = resources(FhirDestination(url="http://ehr/fhir"), report)
    assert [r4_errors(r) for r in [*observations, diagnostic]] == [[]] * 3
    grown = observations[0]
    change = grown["component"][0]
    assert change["code"]["coding"][0]["code"] == "111049"
    assert change["valueCodeableConcept"]["coding"][0]["code"] == "15454001"
    assert "Diameter (prior)" in [c["code"].get("text") for c in grown["component"]]
    assert observations[1]["interpretation"][0]["coding"][0]["code"] == "N"
