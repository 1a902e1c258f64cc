"""What happened in the node, as typed events, for the audit trail and the metrics.

The stages that see a security-relevant or countable moment (the SCP, the deliverer, retention,
start-up) emit one event; the :class:`Events` fan-out hands it to every sink. A sink that fails
is logged and skipped: an audit or metrics problem must never fail a C-STORE or a delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyRef:
    """A study an event concerns, as PS3.15 A.5.2 participant objects name it."""

    study_uid: str
    patient_id: str | None
    instances: int


@dataclass(frozen=True)
class AssociationAccepted:
    calling_aet: str
    peer_host: str
    called_aet: str


@dataclass(frozen=True)
class AssociationRejected:
    calling_aet: str
    peer_host: str
    called_aet: str
    reason: str


@dataclass(frozen=True)
class InstanceReceived:
    """One C-STORE answered: stored (or a repeat of a stored instance), or refused."""

    stored: bool
    size: int
    fast_path: bool = False  # answered by dicom_node.receive, not by pynetdicom


@dataclass(frozen=True)
class StudiesReceived:
    """What one association stored, per study; reported when it ends."""

    calling_aet: str
    peer_host: str
    called_aet: str
    studies: tuple[StudyRef, ...]
    released: bool  # False: the association was aborted


@dataclass(frozen=True)
class DeliveryAttempted:
    """One attempt at sending a job's results to a destination."""

    destination: str  # the configured name, or 'sender'
    target: str  # AE@host:port, a URL or a folder
    studies: tuple[StudyRef, ...]
    ok: bool
    dead: bool = False  # the attempt made it a dead letter
    error: str | None = None


@dataclass(frozen=True)
class RoutedJob:
    """One inference job a routing decision queued, with its rule's priority class."""

    job_id: int
    algorithm: str
    priority: str  # stat, urgent, routine


@dataclass(frozen=True)
class JobsRouted:
    """A routing decision queued inference jobs for a completed series or study."""

    level: str  # series or study
    studies: tuple[StudyRef, ...]
    jobs: tuple[RoutedJob, ...]


@dataclass(frozen=True)
class DataDeleted:
    """Retention deleted received instances or results of a study."""

    what: str  # 'received instances' or 'results of job N'
    studies: tuple[StudyRef, ...]
    files: int
    bytes: int


@dataclass(frozen=True)
class JobChanged:
    """A person cancelled or requeued a job, from the command line or the HTTP API."""

    job_id: int
    action: str  # 'cancelled' or 'requeued'
    was: str  # the job's state before
    algorithm: str | None  # of an inference job
    requestor: str  # who asked: the user running the command line, or the API's client
    requestor_host: str | None  # from where: the command line's host, the client's address
    studies: tuple[StudyRef, ...]  # whose data the job is on


@dataclass(frozen=True)
class NodeStarted:
    version: str
    ae_title: str
    config_source: str  # the file, or 'embedded defaults'
    config_sha256: str  # of the effective configuration


@dataclass(frozen=True)
class NodeStopped:
    version: str
    ae_title: str


@dataclass(frozen=True)
class DicomwebRead:
    """A DICOMweb client searched (QIDO-RS) or retrieved (WADO-RS) what the node holds."""

    client_host: str
    client: str  # who: a client certificate's name, or what authorised the request
    search: bool  # QIDO-RS; else WADO-RS
    resource: str  # the path and query asked for
    studies: tuple[StudyRef, ...]  # the study a retrieval was of, when its path names one
    status: int  # the HTTP status answered


Event = (
    AssociationAccepted
    | AssociationRejected
    | InstanceReceived
    | StudiesReceived
    | DeliveryAttempted
    | JobsRouted
    | DataDeleted
    | JobChanged
    | DicomwebRead
    | NodeStarted
    | NodeStopped
)


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


@dataclass
class Events:
    """Hands every event to each sink in turn."""

    sinks: list[Sink] = field(default_factory=list)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:
                log.exception("%s could not record %s", type(sink).__name__, type(event).__name__)


def study_refs(paths: Iterable[Path]) -> tuple[StudyRef, ...]:
    """The studies (and patients) of Part-10 files, read from their headers only.

    Files that cannot be read are left out: an audit record must not fail the work it records.
    """
    found: dict[str, tuple[object, int]] = {}  # study UID -> (patient ID, files)
    for path in paths:
        try:
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "PatientID"]
            )
        except (OSError, ValueError, EOFError, InvalidDicomError, RecursionError):
            continue  # RecursionError: sequences nested too deep for pydicom
        study = str(ds.get("StudyInstanceUID", ""))
        patient, count = found.get(study, (ds.get("PatientID"), 0))
        found[study] = (patient, count + 1)
    return tuple(
        StudyRef(uid, str(patient) if patient else None, count)
        for uid, (patient, count) in found.items()
    )
