"""What a notification says: one job's result as the clinicians' systems are told of it.

The deliverer (:mod:`dicom_node.deliver`) hands a job's delivered objects to this module, which
reads them into a :class:`Report`, and to one of the protocol modules that render and send it:
:mod:`dicom_node.notify_webhook` (JSON), :mod:`dicom_node.notify_hl7` (HL7 v2.5.1 ORU^R01 over
MLLP) and :mod:`dicom_node.notify_fhir` (FHIR R4 DiagnosticReport and Observations). Data flows
one way: this module knows nothing of the deliveries table.

The findings are read from the job's TID 1500 Measurement Report (PS3.16), the SR the PACS
gets, so that a notification says what the DICOM results say, coded as they are there: one
finding per tracked lesion or region (a planar and a volumetric group of one lesion share a
Tracking UID, PS3.16 TID 1410/1411, and are one finding) and one per TID 1501 group. A finding
is **positive** when its qualitative evaluation says Present (SCT 52101004), negative when it
says Absent (SCT 272519000); a located finding with no evaluation is positive unless it is an
anatomical structure (SCT 91723000, a region measured rather than an abnormality found) or
every size measured of it is 0. A lung nodule follow-up's group (TID 1501 with a Qualitative
Difference, TID 4108) shares its lesion's Tracking UID: its change (new, increase in size, ...)
joins the finding, and the prior's measurements are marked ``prior`` (their images are the SR's
Pertinent Other Evidence), a volume change ``Fractional Change``; a resolved lesion is a
negative finding of its own. The identity of the study (patient ID and name, accession
number) is read from an instance of the job's input as it was received, not from the results
(which hold a cleaned copy, :mod:`dicom_node.copied`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.algorithm import DEMO_WARNING
from dicom_node.config import NotifyRule
from dicom_node.errors import DestinationRefused
from dicom_node.priority import PRIORITIES, Priority, rank

__all__ = [
    "Code",
    "Finding",
    "Measurement",
    "Report",
    "ResultObject",
    "StudyIdentity",
    "idempotency_key",
    "notified_priority",
    "read_findings",
    "read_identity",
    "selected",
]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

# PS3.16 codes the measurement groups are read by.
_MEASUREMENT_GROUP = ("DCM", "125007")
_TRACKING_ID = ("DCM", "112039")
_TRACKING_UID = ("DCM", "112040")
_FINDING = ("DCM", "121071")
_FINDING_SITE = ("SCT", "363698007")
_ALGORITHM_NAME = ("DCM", "111001")
_ALGORITHM_VERSION = ("DCM", "111003")
_ALGORITHM_PARAMETERS = ("DCM", "111002")
_PRESENT = ("SCT", "52101004")
_ABSENT = ("SCT", "272519000")
_ANATOMICAL_STRUCTURE = ("SCT", "91723000")
_QUALITATIVE_DIFFERENCE = ("DCM", "111049")  # a follow-up's change (PS3.16 TID 4108)
_DERIVATION = ("DCM", "121401")
_SIZES = {("SCT", "81827009"), ("SCT", "42798000"), ("SCT", "118565006")}  # diameter, area, vol.


@dataclass(frozen=True)
class Code:
    """A coded concept: coding scheme designator, code value, code meaning (PS3.3 8.8)."""

    scheme: str
    value: str
    meaning: str

    @classmethod
    def of(cls, item: Dataset) -> Code:
        return cls(
            str(item.CodingSchemeDesignator),
            str(item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")),
            str(item.CodeMeaning),
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.scheme, self.value)


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement: what (e.g. SCT 81827009 Diameter), its value and UCUM unit."""

    concept: Code
    value: float
    unit: Code
    # "prior": measured on the prior study of a follow-up (its image is among the SR's
    # Pertinent Other Evidence); else the derivation's meaning (e.g. "Fractional Change").
    qualifier: str | None = None

    @property
    def name(self) -> str:
        """What was measured, for a reader: "Diameter", "Diameter (prior)"."""
        return self.concept.meaning + (f" ({self.qualifier})" if self.qualifier else "")


@dataclass(frozen=True)
class Finding:
    """One finding of the report, positive or negative (see the module's docstring)."""

    label: str  # the Tracking Identifier
    finding: Code
    positive: bool
    site: Code | None = None
    measurements: tuple[Measurement, ...] = ()
    change: Code | None = None  # since the prior study: new, increase in size, ...


@dataclass(frozen=True)
class ResultObject:
    """A DICOM object the job wrote (and the route's DICOM destinations were sent)."""

    kind: str  # SEG, SR, SC
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    path: Path

    @property
    def wado_rs_path(self) -> str:
        """Where the node's WADO-RS serves it, relative to its HTTP base (PS3.18 10.4)."""
        return (
            f"/dicom-web/studies/{{study}}/series/{self.series_uid}"
            f"/instances/{self.sop_instance_uid}"
        )


@dataclass(frozen=True)
class StudyIdentity:
    """The study and patient as the modality or PACS sent them."""

    study_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    modality: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class Report:
    """One job's result, as every notification protocol renders it."""

    job_id: int
    destination: str
    algorithm: str
    version: str
    demo: bool
    priority: Priority  # the one the notification carries (notified_priority)
    study: StudyIdentity
    findings: tuple[Finding, ...]
    objects: tuple[ResultObject, ...]
    node_ae_title: str
    key: str = field(default="")  # idempotency_key(objects, destination)
    made_at: str = ""  # when the result was made (DICOM DT, the SR's Content Date and Time)

    @property
    def positive(self) -> bool:
        return any(f.positive for f in self.findings)

    @property
    def demo_warning(self) -> str | None:
        return DEMO_WARNING if self.demo else None

    def wado_rs_path(self, obj: ResultObject) -> str:
        return obj.wado_rs_path.replace("{study}", self.study.study_uid)


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    return Code.of(names[0]).key


def _groups(items: Sequence[Dataset]) -> list[Dataset]:
    """Every TID 1501/1410/1411 measurement group in a content tree, depth first."""
    found: list[Dataset] = []
    for item in items:
        if item.get("ValueType") == "CONTAINER" and _concept(item) == _MEASUREMENT_GROUP:
            found.append(item)
        elif "ContentSequence" in item:
            found.extend(_groups(item.ContentSequence))
    return found


def _texts(items: Sequence[Dataset], concept: tuple[str, str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if _concept(item) == concept and item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        if "ContentSequence" in item:
            out.extend(_texts(item.ContentSequence, concept))
    return out


@dataclass
class _Lesion:
    label: str
    finding: Code | None = None
    site: Code | None = None
    evaluation: bool | None = None  # Present / Absent, when a group states one
    change: Code | None = None
    measurements: list[Measurement] = field(default_factory=list)


def read_findings(sr: Dataset) -> tuple[str, str, bool, tuple[Finding, ...]]:
    """The algorithm's name and version, whether its weights are the DEMO ones, and the
    findings of a TID 1500 Measurement Report (the algorithm identification, PS3.16 TID 4019,
    names the weights ``weights DEMO``)."""
    content = list(sr.get("ContentSequence") or [])
    names = _texts(content, _ALGORITHM_NAME)
    versions = _texts(content, _ALGORITHM_VERSION)
    demo = "weights DEMO" in _texts(content, _ALGORITHM_PARAMETERS)
    prior_images = {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.get("PertinentOtherEvidenceSequence") or []
        for series in study.get("ReferencedSeriesSequence") or []
        for instance in series.get("ReferencedSOPSequence") or []
    }
    lesions: dict[str, _Lesion] = {}
    for group in _groups(content):
        items = list(group.get("ContentSequence") or [])
        label = next((str(i.TextValue) for i in items if _concept(i) == _TRACKING_ID), "finding")
        uid = next((str(i.UID) for i in items if _concept(i) == _TRACKING_UID), label)
        lesion = lesions.setdefault(uid, _Lesion(label))
        for item in items:
            concept, kind = _concept(item), item.get("ValueType")
            if kind == "CODE" and "ConceptCodeSequence" in item:
                value = Code.of(item.ConceptCodeSequence[0])
                if concept == _FINDING:
                    lesion.finding = value
                elif concept == _FINDING_SITE:
                    lesion.site = value
                elif concept == _QUALITATIVE_DIFFERENCE:
                    lesion.change = value
                elif value.key in (_PRESENT, _ABSENT):
                    present = value.key == _PRESENT
                    lesion.evaluation = present or bool(lesion.evaluation)
            elif kind == "NUM" and item.get("MeasuredValueSequence"):
                measured = item.MeasuredValueSequence[0]
                lesion.measurements.append(
                    Measurement(
                        Code.of(item.ConceptNameCodeSequence[0]),
                        float(measured.NumericValue),
                        Code.of(measured.MeasurementUnitsCodeSequence[0]),
                        _qualifier(item, prior_images),
                    )
                )
    findings = []
    for lesion in lesions.values():
        what = lesion.finding or Code("SCT", "404684003", "Clinical finding")
        if lesion.evaluation is not None:
            positive = lesion.evaluation
        else:
            sizes = [m.value for m in lesion.measurements if m.concept.key in _SIZES]
            positive = what.key != _ANATOMICAL_STRUCTURE and (not sizes or any(sizes))
        findings.append(
            Finding(
                lesion.label,
                what,
                positive,
                lesion.site,
                tuple(lesion.measurements),
                lesion.change,
            )
        )
    return (names[0] if names else "", versions[0] if versions else "", demo, tuple(findings))


def _qualifier(num: Dataset, prior_images: set[str]) -> str | None:
    """ "prior" for a NUM inferred from an image of the prior study, else its derivation."""
    for child in num.get("ContentSequence") or []:
        if child.get("ValueType") == "IMAGE":
            for ref in child.get("ReferencedSOPSequence") or []:
                if str(ref.ReferencedSOPInstanceUID) in prior_images:
                    return "prior"
        if _concept(child) == _DERIVATION and "ConceptCodeSequence" in child:
            return str(child.ConceptCodeSequence[0].CodeMeaning)
    return None


def read_identity(source: Path | None, fallback: Dataset) -> StudyIdentity:
    """The study's identity from an instance as received (``source``), or else from a result
    (``fallback``), whose copy of it was cleaned (:mod:`dicom_node.copied`)."""
    ds = fallback
    if source is not None:
        try:
            ds = dcmread(source, stop_before_pixels=True)
        except (OSError, ValueError, EOFError, InvalidDicomError):
            ds = fallback

    def text(keyword: str) -> str:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()

    return StudyIdentity(
        study_uid=str(fallback.StudyInstanceUID),
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        patient_sex=text("PatientSex"),
        accession_number=text("AccessionNumber"),
        modality=text("Modality"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        study_description=text("StudyDescription"),
    )


def idempotency_key(objects: Sequence[ResultObject], destination: str) -> str:
    """The same for every attempt of one job's delivery to one destination, and for no other:
    the results' SOP Instance UIDs are globally unique (PS3.5 9) and re-sent unchanged."""
    uids = "/".join(sorted(o.sop_instance_uid for o in objects))
    return hashlib.sha256(f"{uids}|{destination}".encode()).hexdigest()


def notified_priority(job_priority: Priority, positive: bool, rule: NotifyRule) -> Priority:
    """The job's class, raised to ``rule.positive_priority`` for a positive result."""
    if positive and rule.positive_priority is not None:
        return PRIORITIES[min(rank(job_priority), rank(rule.positive_priority))]
    return job_priority


def selected(rule: NotifyRule, algorithm: str, job_priority: Priority, positive: bool) -> bool:
    """Whether ``rule`` lets a result of ``algorithm``, from a job of ``job_priority``, be
    notified."""
    if rule.only_positive and not positive:
        return False
    if rule.algorithms is not None and algorithm not in rule.algorithms:
        return False
    return rule.priorities is None or job_priority in rule.priorities


def build_report(
    *,
    job_id: int,
    destination: str,
    job_algorithm: str,
    job_priority: Priority,
    objects: Sequence[ResultObject],
    source: Path | None,
    node_ae_title: str,
    rule: NotifyRule,
) -> Report:
    """The report of one job's results for one destination; :class:`DestinationRefused` when
    the results cannot be read (a retry would read the same files)."""
    srs = [o for o in objects if o.sop_class_uid == COMPREHENSIVE_3D_SR or o.kind == "SR"]
    first = srs[0] if srs else (objects[0] if objects else None)
    if first is None:
        raise DestinationRefused(f"job {job_id} has no result objects to notify of")
    try:
        ds = dcmread(first.path)
        name, version, demo, findings = read_findings(ds) if srs else ("", "", False, ())
    except (OSError, EOFError, InvalidDicomError, AttributeError, KeyError, ValueError) as exc:
        # Our own writers made it: a file that does not read is damaged, and reads no
        # better on the next attempt.
        raise DestinationRefused(
            f"job {job_id}'s {first.kind} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    positive = any(f.positive for f in findings)
    return Report(
        job_id=job_id,
        destination=destination,
        algorithm=name or job_algorithm,
        version=version,
        demo=demo,
        priority=notified_priority(job_priority, positive, rule),
        study=read_identity(source, ds),
        findings=findings,
        objects=tuple(objects),
        node_ae_title=node_ae_title,
        key=idempotency_key(objects, destination),
        made_at=_made_at(ds),
    )


def _made_at(ds: Dataset) -> str:
    """YYYYMMDDHHMMSS of the object's Content Date and Time (PS3.3 C.7.6.1), or ''."""
    date = str(ds.get("ContentDate") or "")
    time = str(ds.get("ContentTime") or "").split(".")[0]
    return f"{date}{time}"[:14] if len(date) == 8 else ""
