"""The audit trail: security-relevant events as append-only JSON lines.

Each line is one audit message with the structure and element names of the DICOM Audit
Message schema (PS3.15 A.5.1): ``EventIdentification``, ``ActiveParticipant``,
``AuditSourceIdentification`` and ``ParticipantObjectIdentification``, coded with the DICOM
event IDs of PS3.15 A.5.3 and PS3.16 CID 400-405 — the same events IHE ATNA records:

======================================  ==========================================
node started / stopped                   Application Activity (110100), Start/Stop
configuration loaded                     Security Alert (110113), Software Configuration
association accepted / rejected          Security Alert (110113), Node Authentication
studies received (per association)       DICOM Instances Transferred (110104), C
jobs queued by a routing decision        DICOM Instances Accessed (110103), R
results sent (per attempt)               DICOM Instances Transferred (110104), R
data deleted by retention                DICOM Study Deleted (110105), D
job cancelled or requeued by a person    Procedure Record (110111), U
======================================  ==========================================

Audit messages name patients and studies (PS3.15 A.5.2.6), as they must; the file is created
readable by the node's user only. It is rotated by size; nothing is ever rewritten in place.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.config import AuditConfig
from dicom_node.events import (
    AssociationAccepted,
    AssociationRejected,
    DataDeleted,
    DeliveryAttempted,
    DicomwebRead,
    Event,
    JobChanged,
    JobsRouted,
    NodeStarted,
    NodeStopped,
    StudiesReceived,
    StudyRef,
)

AUDIT_DIR = "audit"

# PS3.15 A.5.1 EventOutcomeIndicator.
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8

# Coded values, PS3.16 CID 400-405 (pydicom's DCM codes), and RFC 3881's participant object
# ID types, which no pydicom code table holds.
APPLICATION_ACTIVITY: Code = codes.DCM.ApplicationActivity
INSTANCES_TRANSFERRED: Code = codes.DCM.DICOMInstancesTransferred
INSTANCES_ACCESSED: Code = codes.DCM.DICOMInstancesAccessed
STUDY_DELETED: Code = codes.DCM.DICOMStudyDeleted
PROCEDURE_RECORD: Code = codes.DCM.ProcedureRecord
QUERY: Code = codes.DCM.Query
SECURITY_ALERT: Code = codes.DCM.SecurityAlert
APPLICATION_START: Code = codes.DCM.ApplicationStart
APPLICATION_STOP: Code = codes.DCM.ApplicationStop
NODE_AUTHENTICATION: Code = codes.DCM.NodeAuthentication
SOFTWARE_CONFIGURATION: Code = codes.DCM.SoftwareConfiguration
APPLICATION: Code = codes.DCM.Application
DESTINATION_ROLE: Code = codes.DCM.DestinationRoleID
SOURCE_ROLE: Code = codes.DCM.SourceRoleID
STUDY_UID_TYPE: Code = codes.DCM.StudyInstanceUID
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

# PS3.15 A.5.1: NetworkAccessPointTypeCode 1 = machine name, 2 = IP address;
# AuditSourceTypeCode 4 = application server process tier.
_MACHINE_NAME, _IP_ADDRESS = "1", "2"
_APPLICATION_SERVER = "4"


def _code(value: Code) -> dict[str, str]:
    """A coded value as the audit message schema spells it (PS3.15 A.5.1)."""
    return {
        "csd-code": value.value,
        "codeSystemName": value.scheme_designator,
        "originalText": value.meaning,
    }


def _access_point(host: str) -> dict[str, str]:
    try:
        ipaddress.ip_address(host)
        kind = _IP_ADDRESS
    except ValueError:
        kind = _MACHINE_NAME
    return {"NetworkAccessPointID": host, "NetworkAccessPointTypeCode": kind}


def participant(
    user_id: str,
    *,
    requestor: bool,
    role: Code | None = None,
    host: str | None = None,
    ae_title: str | None = None,
) -> dict[str, Any]:
    """An ActiveParticipant (PS3.15 A.5.1); AE titles as ``AETITLES=`` (A.5.2.1)."""
    entry: dict[str, Any] = {"UserID": user_id, "UserIsRequestor": requestor}
    if ae_title is not None:
        entry["AlternativeUserID"] = f"AETITLES={ae_title}"
    if role is not None:
        entry["RoleIDCode"] = _code(role)
    if host is not None:
        entry.update(_access_point(host))
    return entry


def study_objects(studies: tuple[StudyRef, ...]) -> list[dict[str, Any]]:
    """ParticipantObjectIdentification for each study and its patient (PS3.15 A.5.2.6/7)."""
    objects: list[dict[str, Any]] = []
    patients: set[str] = set()
    for study in studies:
        objects.append(
            {
                "ParticipantObjectID": study.study_uid,
                "ParticipantObjectTypeCode": 2,  # system object
                "ParticipantObjectTypeCodeRole": 3,  # report
                "ParticipantObjectIDTypeCode": _code(STUDY_UID_TYPE),
                "ParticipantObjectDescription": {"NumberOfInstances": study.instances},
            }
        )
        if study.patient_id and study.patient_id not in patients:
            patients.add(study.patient_id)
            objects.append(
                {
                    "ParticipantObjectID": study.patient_id,
                    "ParticipantObjectTypeCode": 1,  # person
                    "ParticipantObjectTypeCodeRole": 1,  # patient
                    "ParticipantObjectIDTypeCode": _code(PATIENT_NUMBER),
                }
            )
    return objects


class _PrivateRotatingFile(RotatingFileHandler):
    """A rotating file created with mode 0600: audit messages identify patients."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Mode "a": a RotatingFileHandler always appends (self.mode is "a").
        return open(fd, "a", encoding=self.encoding)


class AuditTrail:
    """Writes audit messages for node events; an :class:`~dicom_node.events.Events` sink."""

    def __init__(self, config: AuditConfig, data_dir: Path, ae_title: str) -> None:
        self.path = config.path or data_dir / AUDIT_DIR / "audit.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host = socket.gethostname()
        self.source_id = config.source_id or self.host
        self._handler = _PrivateRotatingFile(
            self.path,
            maxBytes=config.max_bytes,
            backupCount=config.backup_count,
            encoding="utf-8",
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def close(self) -> None:
        self._handler.close()

    # -- messages ------------------------------------------------------------------------------

    def _us(self, *, requestor: bool, role: Code | None = None) -> dict[str, Any]:
        return participant(
            f"dicom-node[{os.getpid()}]",
            requestor=requestor,
            role=role,
            host=self.host,
            ae_title=self.ae_title,
        )

    def message(
        self,
        event_id: Code,
        action: str,
        outcome: int,
        participants: list[dict[str, Any]],
        objects: list[dict[str, Any]] | None = None,
        *,
        event_type: Code | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """One audit message (PS3.15 A.5.1)."""
        identification: dict[str, Any] = {
            "EventID": _code(event_id),
            "EventActionCode": action,
            "EventDateTime": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome,
        }
        if event_type is not None:
            identification["EventTypeCode"] = [_code(event_type)]
        if description:
            identification["EventOutcomeDescription"] = description
        message: dict[str, Any] = {
            "EventIdentification": identification,
            "ActiveParticipant": participants,
            "AuditSourceIdentification": {
                "AuditSourceID": self.source_id,
                "AuditSourceTypeCode": _APPLICATION_SERVER,
            },
        }
        if objects:
            message["ParticipantObjectIdentification"] = objects
        return message

    def _application_activity(self, kind: Code, version: str) -> dict[str, Any]:
        """Application Activity (PS3.15 A.5.3.1): the node started or stopped."""
        return self.message(
            APPLICATION_ACTIVITY,
            "E",
            SUCCESS,
            [self._us(requestor=False, role=APPLICATION)],
            event_type=kind,
            description=f"dicom-node {version}",
        )

    def write(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self._handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
            self._handler.flush()

    def emit(self, event: Event) -> None:
        for message in self.messages(event):
            self.write(message)

    def messages(self, event: Event) -> list[dict[str, Any]]:
        """The audit messages an event is recorded as (none for events that are only counted)."""
        match event:
            case NodeStarted():
                return [
                    self._application_activity(APPLICATION_START, event.version),
                    self.message(
                        SECURITY_ALERT,
                        "E",
                        SUCCESS,
                        [self._us(requestor=True)],
                        [
                            {
                                "ParticipantObjectID": event.config_source,
                                "ParticipantObjectTypeCode": 2,
                                "ParticipantObjectTypeCodeRole": 13,  # security resource
                                "ParticipantObjectIDTypeCode": _code(URI),
                                "ParticipantObjectDetail": [
                                    {"type": "sha256", "value": event.config_sha256}
                                ],
                            }
                        ],
                        event_type=SOFTWARE_CONFIGURATION,
                        description="configuration loaded",
                    ),
                ]
            case NodeStopped():
                return [self._application_activity(APPLICATION_STOP, event.version)]
            case AssociationAccepted() | AssociationRejected():
                rejected = isinstance(event, AssociationRejected)
                return [
                    self.message(
                        SECURITY_ALERT,
                        "E",
                        MINOR_FAILURE if rejected else SUCCESS,
                        [
                            participant(
                                # A peer refused before it named itself (TLS) is its address.
                                event.calling_aet or event.peer_host,
                                requestor=True,
                                host=event.peer_host,
                                ae_title=event.calling_aet or None,
                            ),
                            self._us(requestor=False),
                        ],
                        event_type=NODE_AUTHENTICATION,
                        description=(
                            f"association rejected: {event.reason}"
                            if isinstance(event, AssociationRejected)
                            else f"association accepted (called AE {event.called_aet})"
                        ),
                    )
                ]
            case StudiesReceived():
                if not event.studies:
                    return []
                return [
                    self.message(
                        INSTANCES_TRANSFERRED,
                        "C",
                        SUCCESS if event.released else MINOR_FAILURE,
                        [
                            participant(
                                event.calling_aet,
                                requestor=True,
                                role=SOURCE_ROLE,
                                host=event.peer_host,
                                ae_title=event.calling_aet,
                            ),
                            self._us(requestor=False, role=DESTINATION_ROLE),
                        ],
                        study_objects(event.studies),
                        description=None if event.released else "association aborted",
                    )
                ]
            case DeliveryAttempted():
                outcome = SUCCESS if event.ok else SERIOUS_FAILURE if event.dead else MINOR_FAILURE
                return [
                    self.message(
                        INSTANCES_TRANSFERRED,
                        "R",
                        outcome,
                        [
                            self._us(requestor=True, role=SOURCE_ROLE),
                            participant(event.target, requestor=False, role=DESTINATION_ROLE),
                        ],
                        study_objects(event.studies),
                        description=(
                            f"results to {event.destination}"
                            + ("" if event.ok else f": {event.error}")
                            + (" (dead letter)" if event.dead else "")
                        ),
                    )
                ]
            case JobsRouted():
                # The studies an algorithm is to read (A.5.3.2, action R), per decision; the
                # priority each job was queued with is what a later review of its wait needs.
                return [
                    self.message(
                        INSTANCES_ACCESSED,
                        "R",
                        SUCCESS,
                        [self._us(requestor=True, role=APPLICATION)],
                        study_objects(event.studies),
                        description=f"{event.level} routed: "
                        + "; ".join(
                            f"{job.algorithm} as job {job.job_id}, priority {job.priority}"
                            for job in event.jobs
                        ),
                    )
                ]
            case JobChanged():
                # PS3.15 A.5.3, Procedure Record: the job (as a UPS would be) was updated.
                job = {
                    "ParticipantObjectID": f"/api/jobs/{event.job_id}",
                    "ParticipantObjectTypeCode": 2,  # system object
                    "ParticipantObjectTypeCodeRole": 20,  # job (RFC 3881)
                    "ParticipantObjectIDTypeCode": _code(URI),
                }
                return [
                    self.message(
                        PROCEDURE_RECORD,
                        "U",
                        SUCCESS,
                        [
                            participant(event.requestor, requestor=True, host=event.requestor_host),
                            self._us(requestor=False),
                        ],
                        [job, *study_objects(event.studies)],
                        description=(
                            f"job {event.job_id}"
                            + (f" ({event.algorithm})" if event.algorithm else "")
                            + f" {event.action} (it was {event.was})"
                        ),
                    )
                ]
            case DicomwebRead():
                client = participant(
                    event.client, requestor=True, role=DESTINATION_ROLE, host=event.client_host
                )
                outcome = SUCCESS if event.status < 400 else MINOR_FAILURE
                if event.search:
                    # PS3.15 A.5.3.10 Query: the query itself is the participant object.
                    query = {
                        "ParticipantObjectID": event.resource,
                        "ParticipantObjectTypeCode": 2,  # system object
                        "ParticipantObjectTypeCodeRole": 24,  # query
                        "ParticipantObjectIDTypeCode": _code(URI),
                        "ParticipantObjectQuery": base64.b64encode(
                            event.resource.encode()
                        ).decode(),
                    }
                    return [
                        self.message(
                            QUERY,
                            "E",
                            outcome,
                            [client, self._us(requestor=False, role=SOURCE_ROLE)],
                            [query],
                            description=f"QIDO-RS ({event.status})",
                        )
                    ]
                return [
                    self.message(
                        INSTANCES_TRANSFERRED,
                        "R",
                        outcome,
                        [client, self._us(requestor=False, role=SOURCE_ROLE)],
                        study_objects(event.studies),
                        description=f"WADO-RS {event.resource} ({event.status})",
                    )
                ]
            case DataDeleted():
                return [
                    self.message(
                        STUDY_DELETED,
                        "D",
                        SUCCESS,
                        [self._us(requestor=True)],
                        study_objects(event.studies),
                        description=(
                            f"retention deleted {event.what}: {event.files} file(s),"
                            f" {event.bytes} bytes"
                        ),
                    )
                ]
        return []
