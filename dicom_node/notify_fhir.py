"""FHIR R4 notifications: a DiagnosticReport with one Observation per finding, each written by
a conditional update on its identifier (FHIR R4 RESTful API, http.html#cond-update:
``PUT [base]/Observation?identifier=system|value``), so that a resend updates what the server
has rather than adding a second copy.

The resources are built with ``fhir.resources`` (8.x, pydantic 2). Its ``R4B`` models are the
R4 family's it ships (its 6.x line, the last with 4.0.1 models, needs pydantic 1); the
elements used here are the same in R4 (4.0.1) and R4B, and the tests check every resource
against the official FHIR R4 JSON schema.

- ``Observation`` per finding (status ``final``, category ``imaging``): ``code`` the
  finding's code (SNOMED CT, DICOM or the algorithm's scheme), ``valueCodeableConcept``
  Present (SCT 52101004) or Absent (SCT 272519000), ``interpretation`` ``A`` (abnormal) or
  ``N`` (v3-ObservationInterpretation), a ``component`` per measurement with a UCUM
  ``valueQuantity``, ``bodySite`` its site, ``derivedFrom`` the ImagingStudy; the DEMO
  warning as a ``note``.
- ``DiagnosticReport`` (status ``final``, category ``RAD``): ``result`` the Observations (by
  the ids the server gave them), ``imagingStudy`` the study by identifier (system
  ``urn:dicom:uid``, value ``urn:oid:<Study Instance UID>``, as ImagingStudy.identifier
  carries it), ``basedOn`` the order by its accession number (identifier type ``ACSN``),
  ``subject`` the patient by the ID as received, ``presentedForm`` each DICOM result
  (``application/dicom``, its WADO-RS path), ``conclusion`` the positive findings and the
  DEMO warning.

The identifiers' values derive from the job's result objects and the destination
(:func:`dicom_node.notify.idempotency_key`), so every attempt names the same resources.
Answers: 200 or 201 is done; 408, 429, 5xx, a timeout or a connection error is tried again;
412 (several resources match the identifier) and other 4xx are refused for good.
"""

from __future__ import annotations

from typing import Any

from dicom_node.config import FhirDestination
from dicom_node.errors import DestinationRefused, DestinationUnavailable
from dicom_node.notify import Code, Finding, Report

__all__ = ["diagnostic_report", "observations", "resources", "send_fhir", "system_of"]

_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
}
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_PRESENT = Code("SCT", "52101004", "Present")
_ABSENT = Code("SCT", "272519000", "Absent")
DICOM_UID = "urn:dicom:uid"  # ImagingStudy.identifier's system for the Study Instance UID


def system_of(scheme: str) -> str:
    """The FHIR code system URI of a DICOM coding scheme designator (PS3.16 Table 8-1);
    the algorithm's own schemes get a URN of ours."""
    return _SYSTEMS.get(scheme, f"urn:dicom-node:scheme:{scheme}")


def _concept(code: Code) -> dict[str, Any]:
    return {
        "coding": [{"system": system_of(code.scheme), "code": code.value, "display": code.meaning}],
        "text": code.meaning,
    }


def _study_reference(report: Report) -> dict[str, Any]:
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{report.study.study_uid}"},
    }


def _subject(report: Report) -> dict[str, Any] | None:
    if not report.study.patient_id:
        return None
    identifier: dict[str, Any] = {"value": report.study.patient_id}
    if report.study.issuer_of_patient_id:
        identifier["assigner"] = {"display": report.study.issuer_of_patient_id}
    return {"type": "Patient", "identifier": identifier}


def _effective(report: Report) -> str | None:
    date = report.study.study_date
    if len(date) != 8 or not date.isdigit():
        return None
    return f"{date[:4]}-{date[4:6]}-{date[6:]}"


def _identifier(target: FhirDestination, value: str) -> dict[str, str]:
    return {"system": target.identifier_system, "value": value}


def _observation(
    target: FhirDestination, report: Report, number: int, finding: Finding
) -> dict[str, Any]:
    from fhir.resources.R4B.observation import Observation

    data: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [_identifier(target, f"{report.key}-{number}")],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                    }
                ]
            }
        ],
        "code": _concept(finding.finding),
        "valueCodeableConcept": _concept(_PRESENT if finding.positive else _ABSENT),
        "interpretation": [
            {"coding": [{"system": _INTERPRETATION, "code": "A" if finding.positive else "N"}]}
        ],
        "derivedFrom": [_study_reference(report)],
        "method": {"text": f"{report.algorithm} {report.version}".strip()},
    }
    if (subject := _subject(report)) is not None:
        data["subject"] = subject
    if (effective := _effective(report)) is not None:
        data["effectiveDateTime"] = effective
    if finding.site is not None:
        data["bodySite"] = _concept(finding.site)
    components: list[dict[str, Any]] = []
    if finding.change is not None:
        components.append(
            {
                "code": _concept(Code("DCM", "111049", "Qualitative Difference")),
                "valueCodeableConcept": _concept(finding.change),
            }
        )
    if finding.measurements:
        components += [
            {
                "code": {**_concept(m.concept), "text": m.name},
                "valueQuantity": {
                    "value": m.value,
                    "unit": m.unit.meaning,
                    "system": system_of(m.unit.scheme),
                    "code": m.unit.value,
                },
            }
            for m in finding.measurements
        ]
    if components:
        data["component"] = components
    if report.demo_warning:
        data["note"] = [{"text": report.demo_warning}]
    validated: dict[str, Any] = Observation.model_validate(data).model_dump(mode="json")
    return validated


def observations(target: FhirDestination, report: Report) -> list[dict[str, Any]]:
    """One Observation per finding, validated by fhir.resources, as JSON."""
    return [_observation(target, report, n, f) for n, f in enumerate(report.findings, 1)]


def diagnostic_report(
    target: FhirDestination, report: Report, observation_ids: list[str]
) -> dict[str, Any]:
    """The DiagnosticReport, its ``result`` the Observations the server holds by id."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    positive = [f.finding.meaning for f in report.findings if f.positive]
    conclusion = (f"Positive: {', '.join(positive)}." if positive else "No positive finding.") + (
        f" {report.demo_warning}." if report.demo_warning else ""
    )
    data: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [_identifier(target, report.key)],
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                },
                {"system": "urn:dicom-node:algorithm", "code": report.algorithm},
            ],
            "text": f"AI {report.algorithm} {report.version}".strip(),
        },
        "imagingStudy": [_study_reference(report)],
        "conclusion": conclusion,
        "presentedForm": [
            {
                "contentType": "application/dicom",
                "url": report.wado_rs_path(o),
                "title": f"{o.kind} {o.sop_instance_uid}",
            }
            for o in report.objects
        ],
    }
    if observation_ids:  # FHIR JSON has no empty arrays (json.html)
        data["result"] = [{"reference": f"Observation/{i}"} for i in observation_ids]
    if report.study.accession_number:
        data["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                            }
                        ]
                    },
                    "value": report.study.accession_number,
                },
            }
        ]
    if (subject := _subject(report)) is not None:
        data["subject"] = subject
    if (effective := _effective(report)) is not None:
        data["effectiveDateTime"] = effective
    validated: dict[str, Any] = DiagnosticReport.model_validate(data).model_dump(mode="json")
    return validated


def resources(target: FhirDestination, report: Report) -> list[dict[str, Any]]:
    """Every resource a delivery writes, the report's result referring to Observation/1..n
    (for a reader that wants them without a server)."""
    obs = observations(target, report)
    return [*obs, diagnostic_report(target, report, [str(n) for n in range(1, len(obs) + 1)])]


def _put(session: Any, target: FhirDestination, resource: dict[str, Any], timeout_s: float) -> str:
    """Conditionally update ``resource`` by its first identifier; the id the server keeps."""
    import requests

    from dicom_node.deliver import http_status_error

    kind = resource["resourceType"]
    identifier = resource["identifier"][0]
    url = f"{target.url.rstrip('/')}/{kind}"
    try:
        response = session.put(
            url,
            params={"identifier": f"{identifier['system']}|{identifier['value']}"},
            json=resource,
            timeout=timeout_s,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise DestinationUnavailable(
            f"FHIR {kind} to {target.url}: {type(exc).__name__}: {exc}"
        ) from exc
    status = response.status_code
    if status not in (200, 201):
        raise http_status_error(f"FHIR PUT {kind} to {target.url}", status)
    try:
        body = response.json() if response.content else {}
    except ValueError:
        body = {}
    if isinstance(body, dict) and body.get("id"):
        return str(body["id"])
    # Prefer: return=minimal, or a server that answers without a body: the Location header,
    # [base]/Observation/<id>/_history/<version> (FHIR R4 http.html#update).
    parts = str(response.headers.get("Location", "")).split("/")
    if kind in parts and parts.index(kind) + 1 < len(parts):
        return parts[parts.index(kind) + 1]
    raise DestinationUnavailable(f"FHIR PUT {kind} to {target.url}: the server gave no id")


def send_fhir(target: FhirDestination, report: Report, timeout_s: float) -> None:
    """Write the Observations, then the DiagnosticReport that refers to them."""
    import requests

    from dicom_node.deliver import requests_verify

    session = requests.Session()
    session.headers.update(
        {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    )
    if target.token:
        session.headers["Authorization"] = f"Bearer {target.token}"
    session.verify = requests_verify(target.verify)
    from pydantic import ValidationError

    try:
        built = observations(target, report)
        diagnostic_report(target, report, [str(n) for n in range(1, len(built) + 1)])
    except ValidationError as exc:
        # A value FHIR cannot carry (a code with two spaces running): the same every attempt.
        raise DestinationRefused(f"FHIR resources for {target.url}: {exc}") from exc
    ids = [_put(session, target, o, timeout_s) for o in built]
    _put(session, target, diagnostic_report(target, report, ids), timeout_s)
