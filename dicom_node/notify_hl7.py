"""HL7 v2.5.1 notifications: an ORU^R01 (chapter 7.3.1) per job and destination over MLLP.

Built and sent with python-hl7 (the ``hl7`` package): its parser checks every message we
build, its asyncio MLLP client (:mod:`hl7.mllp`) frames it (MLLP release 1, HL7 v2.5.1
Appendix C) and reads the ACK. The message, one per result:

- ``MSH``: sending application our AE title, receiving application and facility as
  configured, MSH-7 the time the result was made and MSH-10 (message control ID) derived from
  the job's result objects and the destination, so that a resend is the same message,
  byte for byte, which a receiver can recognise (2.10.1); MSH-18 ``UNICODE UTF-8``.
- ``PID``: PID-3 the patient ID as received (with the issuer, CX.4), PID-5 the name (DICOM PN
  family^given^middle^prefix^suffix to XPN family^given^middle^suffix^prefix), birth date, sex.
- ``ORC``/``OBR``: the accession number as placer and filler order number (ORC-2/3, OBR-2/3)
  and OBR-18; OBR-4 the algorithm; OBR-7 the study's date and time; OBR-25 ``F`` (final).
- ``NTE`` after the OBR when demo weights made the result: the DEMO warning.
- ``TQ1``: TQ1-9 the priority (S stat, A urgent, R routine: HL7 table 0485).
- ``OBX``, one per finding: OBX-3 its code (SCT, DCM or the algorithm's scheme), OBX-5 the
  result text, OBX-8 ``A`` (abnormal) for a positive finding and ``N`` for a negative one,
  OBX-11 ``F``; then an ``NM`` OBX per measurement (OBX-4 sub-ID the finding's number, OBX-6
  its UCUM unit), the Study Instance UID and each result object's SOP Instance UID.

ACK (2.9.2, MSA-1): ``AA`` (or ``CA``) is sent. ``AR``/``CR``, a reject, says the message
will not be taken as it is: a dead letter at once. ``AE``/``CE``, an application error, may
pass (the receiver's database was busy): tried again, and from the
``max_application_errors``-th attempt on it is a dead letter. No ACK within
``ack_timeout_s``, an ACK that is not for this message, a refused or dropped connection:
tried again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import hl7
import hl7.mllp

from dicom_node.config import Hl7Destination
from dicom_node.errors import DestinationRefused, DestinationUnavailable
from dicom_node.notify import Code, Finding, Report

__all__ = ["CONTROL_ID_LENGTH", "control_id", "message", "send_hl7"]

CONTROL_ID_LENGTH = 20  # MSH-10 is ST of at most 20 characters in v2.5.1
_ENCODING = "utf-8"
_ESCAPER = hl7.parse("MSH|^~\\&|\r")
PRIORITY_CODES = {"stat": "S", "urgent": "A", "routine": "R"}  # HL7 table 0485


def _e(text: str) -> str:
    """``text`` escaped for a field of ours (HL7 v2.5.1 2.7)."""
    return str(_ESCAPER.escape(text))


def control_id(report: Report) -> str:
    """MSH-10: the same for every attempt of one job's delivery to one destination."""
    return report.key[:CONTROL_ID_LENGTH]


def _ce(code: Code) -> str:
    return "^".join(_e(part) for part in (code.value, code.meaning, code.scheme))


def _xpn(dicom_name: str) -> str:
    parts = [*dicom_name.split("^"), "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = parts
    return "^".join(_e(p) for p in (family, given, middle, suffix, prefix))


def _text(finding: Finding) -> str:
    said = "present" if finding.positive else "absent"
    if finding.change is not None:
        said += f", {finding.change.meaning.lower()}"
    measured = "; ".join(f"{m.name} {m.value:g} {m.unit.value}" for m in finding.measurements)
    site = f" in {finding.site.meaning}" if finding.site else ""
    return f"{finding.finding.meaning}{site} ({finding.label}): {said}" + (
        f"; {measured}" if measured else ""
    )


def _observations(report: Report) -> Iterable[list[str]]:
    """The OBX segments' fields after the set ID."""
    for number, finding in enumerate(report.findings, 1):
        flag = "A" if finding.positive else "N"
        yield ["ST", _ce(finding.finding), str(number), _e(_text(finding)), "", "", flag]
        for m in finding.measurements:
            what = Code(m.concept.scheme, m.concept.value, m.name)
            yield ["NM", _ce(what), str(number), f"{m.value:g}", _ce(m.unit), "", ""]
    study = Code("DCM", "110180", "Study Instance UID")
    yield ["ST", _ce(study), "", report.study.study_uid, "", "", ""]
    for obj in report.objects:
        what = Code("99DCMNODE", f"{obj.kind}-SOP", f"{obj.kind} result SOP Instance UID")
        yield ["ST", _ce(what), "", obj.sop_instance_uid, "", "", ""]


def message(target: Hl7Destination, report: Report) -> hl7.Message:
    """The ORU^R01 of ``report`` for ``target``, parsed back by python-hl7."""
    study = report.study
    accession = _e(study.accession_number)
    patient_id = _e(study.patient_id)
    if study.issuer_of_patient_id:
        patient_id += f"^^^{_e(study.issuer_of_patient_id)}"
    observed = (study.study_date + study.study_time.split(".")[0])[:14]
    service = f"{_e(report.algorithm)}^{_e(f'AI {report.algorithm} {report.version}')}^99DCMNODE"
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                _e(report.node_ae_title),
                _e(target.sending_facility),
                _e(target.receiving_application),
                _e(target.receiving_facility),
                report.made_at or time.strftime("%Y%m%d%H%M%S", time.gmtime()),
                "",
                "ORU^R01^ORU_R01",
                control_id(report),
                target.processing_id,
                "2.5.1",
                "",
                "",
                "",
                "",
                "",
                "UNICODE UTF-8",
            ]
        ),
        f"PID|1||{patient_id}||{_xpn(study.patient_name)}||{_e(study.patient_birth_date)}"
        f"|{_e(study.patient_sex)}",
        f"ORC|RE|{accession}|{accession}",
        f"OBR|1|{accession}|{accession}|{service}|||{observed}"
        + "|" * 11
        + f"{accession}"
        + "|" * 7
        + "F",
    ]
    if report.demo_warning:
        segments.append(f"NTE|1|L|{_e(report.demo_warning)}")
    segments.append(f"TQ1|1||||||||{PRIORITY_CODES[report.priority]}")
    for set_id, fields in enumerate(_observations(report), 1):
        value_type, code, sub_id, value, unit, _, flag = fields
        segments.append(f"OBX|{set_id}|{value_type}|{code}|{sub_id}|{value}|{unit}||{flag}|||F")
    return hl7.parse("\r".join(segments) + "\r")


async def _exchange(target: Hl7Destination, text: str) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection(target.host, target.port, encoding=_ENCODING),
        timeout=target.ack_timeout_s,
    )
    try:
        writer.writemessage(text)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), timeout=target.ack_timeout_s)
    finally:
        writer.close()


def send_hl7(target: Hl7Destination, report: Report, *, attempt: int) -> None:
    """Send the ORU^R01 of ``report`` and judge the ACK (see the module's docstring);
    ``attempt`` counts this one (1 for the first)."""
    built = message(target, report)
    where = f"HL7 {target.receiving_application}@{target.host}:{target.port}"
    try:
        ack = asyncio.run(_exchange(target, str(built)))
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise DestinationUnavailable(f"{where}: no ACK within {target.ack_timeout_s:g} s") from exc
    except (OSError, EOFError, asyncio.IncompleteReadError, hl7.mllp.InvalidBlockError) as exc:
        raise DestinationUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
    except (hl7.ParseException, ValueError) as exc:
        raise DestinationUnavailable(f"{where}: the answer is not an HL7 ACK: {exc}") from exc
    try:
        msa = ack.segment("MSA")
    except KeyError as exc:
        raise DestinationUnavailable(f"{where}: the ACK has no MSA segment") from exc
    code, acknowledged = str(msa(1)), str(msa(2))
    if acknowledged != control_id(report):
        raise DestinationUnavailable(f"{where}: an ACK for another message ({acknowledged!r})")
    text = str(msa(3)) if len(msa) > 3 else ""
    detail = f": {text}" if text else ""
    if code in ("AA", "CA"):
        return
    if code in ("AR", "CR"):
        raise DestinationRefused(f"{where}: the message was rejected ({code}){detail}")
    if code in ("AE", "CE"):
        message_ = f"{where}: application error ({code}){detail}"
        if attempt >= target.max_application_errors:
            raise DestinationRefused(f"{message_}, attempt {attempt}: given up")
        raise DestinationUnavailable(message_)
    raise DestinationUnavailable(f"{where}: unknown acknowledgment code {code!r}")
