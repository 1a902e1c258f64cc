"""Fetching what a study lacks from a PACS: durable retrieval jobs and the loop that runs them.

A study-level routing rule whose roles no received series fits, and that names sources in
``fetch_missing``, has its decision queue one ``retrieve`` job per source (:mod:`dicom_node.
route`, in the decision's transaction). This module runs them:

1. **Query** the source for the study's series: C-FIND, Study Root, SERIES level (PS3.4
   C.4.1, C.6.2), or QIDO-RS ``/studies/{study}/series`` (PS3.18 10.6).
2. **Only what is missing**: the series the index does not hold, of the modalities the missing
   roles take.
3. **Retrieve** each: C-MOVE to this node's own SCP (PS3.4 C.4.2; the instances arrive by
   C-STORE through the normal receive path), C-GET (PS3.4 C.4.3; the source's C-STORE
   sub-operations come back on the same association, with SCP/SCU role selection, PS3.7
   D.3.3.4), or WADO-RS ``/studies/{study}/series/{series}`` (PS3.18 10.4). C-GET and WADO-RS
   instances are stored through :meth:`~dicom_node.store.InstanceStore.put`: fsync'd, renamed
   and indexed before a C-GET sub-operation is answered Success, as a C-STORE is.
4. **Marked as retrieved**: every instance the job brought has ``peer_host``
   ``retrieved:<job id>`` (:func:`~dicom_node.jobs.retrieved_host`) and the source's AE title
   as ``calling_aet``; C-MOVE's arrivals are marked once the move answered, by series and
   arrival time.

Jobs are claimed by :meth:`~dicom_node.jobs.JobStore.claim_retrieval`: at most
``max_concurrent`` per source, never two of one study at once, and a failed attempt waits its
backoff (``retrieve.backoff_*``, doubling) before the next; out of ``retrieve.max_attempts``
(or refused for good) the job fails. While a retrieval of a study is queued or running, the
study's completions wait (the job store does not let the router claim them), so the study's
next decision is made once the retrieval ended, with what came: arrivals reopen the study, and
the association release (C-MOVE) or the quiet timer (C-GET, WADO-RS) completes it. A
retrieval that brought nothing completes nothing; how it ended is added to the decision that
asked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import requests
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import NodeConfig, RetrieveSource
from dicom_node.database import Database
from dicom_node.errors import (
    AssociationFailed,
    Permanent,
    RejectedInstance,
    SourceRefused,
    SourceUnavailable,
)
from dicom_node.events import Events, StudiesReceived, study_refs
from dicom_node.facts import study_series
from dicom_node.jobs import Job, JobKind, JobState, RetrievalPayload, job_store, retrieved_host
from dicom_node.loops import Loop, reason
from dicom_node.route import ROUTABLE_SOP_CLASSES, note_retrievals, study_retrievals
from dicom_node.scp import refusal_status
from dicom_node.scu import raise_unestablished, requestor_ae
from dicom_node.store import InstanceStore, Sender, store_key

# The Query/Retrieve SOP classes a retrieval uses as SCU (PS3.4 C.6.2.1): FIND, then MOVE or GET.
QUERY_RETRIEVE_SOP_CLASSES = (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)

log = logging.getLogger(__name__)

# Query/Retrieve statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.5).
_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_MOVE_DESTINATION_UNKNOWN = 0xA801

# What a C-GET proposes for the instances it receives: the source sends what it holds when
# one of these is it, else transcodes. Lossless first, as the SCP prefers them; a few only:
# Orthanc (dcmtk) leaves an association request with every known syntax per context
# unanswered.
_GET_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEG2000,
)


@dataclass(frozen=True)
class RemoteStudy:
    """A study of the patient as the source lists it (a prior's candidates)."""

    study_uid: str
    date: str  # DA
    time: str  # TM


@dataclass(frozen=True)
class RemoteSeries:
    """A series of the study as the source lists it."""

    series_uid: str
    modality: str
    number: int | None
    instances: int | None  # NumberOfSeriesRelatedInstances, when the source says


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _identifier(level: str, **keys: str) -> Dataset:
    """A Study Root query identifier at ``level`` (PS3.4 C.4.1.2.1): ``keys`` are matching
    keys where they hold a value, return keys where they are empty."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def latest_other(studies: list[RemoteStudy], current: str) -> str | None:
    """The most recent of ``studies`` other than ``current`` (by StudyDate, StudyTime)."""
    others = [s for s in studies if s.study_uid != current]
    if not others:
        return None
    return max(others, key=lambda s: (s.date, s.time)).study_uid


def wanted_series(
    remote: list[RemoteSeries], held: set[str], modalities: tuple[str, ...]
) -> list[RemoteSeries]:
    """The source's series to fetch: those the index does not hold, of ``modalities`` (any
    when empty)."""
    return [
        s
        for s in remote
        if s.series_uid not in held and (not modalities or s.modality.upper() in modalities)
    ]


class _Dimse:
    """C-FIND, then C-MOVE or C-GET, on one association with a Query/Retrieve SCP."""

    def __init__(
        self,
        source: RetrieveSource,
        calling_aet: str,
        move_destination: str,
        store: InstanceStore,
        sender: Sender,
    ) -> None:
        assert source.ae_title is not None and source.host is not None and source.port
        self.source = source
        self.called = source.ae_title
        self.host, self.port = source.host, source.port
        self.calling_aet = calling_aet
        self.move_destination = move_destination
        self.store = store
        self.sender = sender
        self.stored = 0
        self.paths: list[Path] = []  # what it stored (C-GET), for the audit trail
        self._assoc: Association | None = None

    @property
    def assoc(self) -> Association:
        assert self._assoc is not None, "outside session()"
        return self._assoc

    @contextmanager
    def session(self) -> Iterator[None]:
        ae = requestor_ae(self.calling_aet, timeout_s=self.source.timeout_s)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        roles: list[Any] = []
        handlers: list[Any] = []
        if self.source.method == "c-get":
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            syntaxes = [str(ts) for ts in _GET_TRANSFER_SYNTAXES]
            for sop_class in sorted(ROUTABLE_SOP_CLASSES):
                ae.add_requested_context(sop_class, syntaxes)
                roles.append(build_role(sop_class, scp_role=True))
            handlers.append((evt.EVT_C_STORE, self._stored))
        else:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        try:
            assoc = ae.associate(
                self.host, self.port, ae_title=self.called, ext_neg=roles, evt_handlers=handlers
            )
            if not assoc.is_established:
                assoc.release()
                raise_unestablished(assoc, f"{self.called} at {self.host}:{self.port}")
        except (AssociationFailed, OSError) as exc:
            raise SourceUnavailable(str(exc)) from exc
        self._assoc = assoc
        try:
            yield None
        finally:
            self._assoc = None
            if assoc.is_established:
                assoc.release()

    def find_studies(self, payload: RetrievalPayload) -> list[RemoteStudy]:
        """The patient's studies made within the payload's dates (C-FIND, STUDY level)."""
        query = _identifier(
            "STUDY",
            PatientID=payload.patient_id,
            StudyDate=payload.dates,
            StudyTime="",
            StudyInstanceUID="",
        )
        if payload.issuer:
            query.IssuerOfPatientID = payload.issuer
        found = [
            RemoteStudy(
                str(identifier.get("StudyInstanceUID", "")),
                str(identifier.get("StudyDate", "") or ""),
                str(identifier.get("StudyTime", "") or ""),
            )
            for identifier in self._c_find(query)
        ]
        return [s for s in found if s.study_uid]

    def find(self, study_uid: str) -> list[RemoteSeries]:
        query = _identifier(
            "SERIES",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID="",
            Modality="",
            SeriesNumber="",
            NumberOfSeriesRelatedInstances="",
        )
        found = [
            RemoteSeries(
                str(identifier.get("SeriesInstanceUID", "")),
                str(identifier.get("Modality", "") or ""),
                _int(identifier.get("SeriesNumber")),
                _int(identifier.get("NumberOfSeriesRelatedInstances")),
            )
            for identifier in self._c_find(query)
        ]
        return [s for s in found if s.series_uid]

    def _c_find(self, query: Dataset) -> Iterator[Dataset]:
        """The pending responses' identifiers of a Study Root C-FIND (PS3.4 C.4.1.1.4)."""
        for status, identifier in self.assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = _status(status, "C-FIND")
            if code in _PENDING and identifier is not None:
                yield identifier
            elif code != _SUCCESS:
                raise SourceUnavailable(f"C-FIND answered failure status 0x{code:04X}")

    def fetch(self, study_uid: str, series: RemoteSeries) -> None:
        query = _identifier(
            "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series.series_uid
        )
        if self.source.method == "c-get":
            responses = self.assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            what = "C-GET"
        else:
            responses = self.assoc.send_c_move(
                query, self.move_destination, StudyRootQueryRetrieveInformationModelMove
            )
            what = "C-MOVE"
        final: Dataset | None = None
        for status, _ in responses:
            if _status(status, what) not in _PENDING:
                final = status
        assert final is not None
        code = int(final.Status)
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        if code == _MOVE_DESTINATION_UNKNOWN:
            raise SourceRefused(
                f"{self.called} does not know the move destination {self.move_destination}"
                " (0xA801): add this node's AE title, host and port to its modalities"
            )
        if code != _SUCCESS or failed:
            raise SourceUnavailable(
                f"{what} ended with status 0x{code:04X}, {failed} sub-operation(s) failed"
            )

    def _stored(self, event: evt.Event) -> int:
        """A C-GET sub-operation's C-STORE: stored as a C-STORE is, answered after."""
        request = cast(C_STORE, event.request)
        try:
            stored = self.store.put(
                event.encoded_dataset(include_meta=False),
                str(event.context.transfer_syntax),
                self.sender,
                expected_sop_class_uid=str(request.AffectedSOPClassUID),
                expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
        except RejectedInstance as exc:
            log.warning("a retrieved instance was not stored: %s", exc)
            return refusal_status(exc)
        except Exception as exc:
            log.warning("a retrieved instance was not stored: %s", reason(exc))
            return refusal_status(exc)
        self.stored += 1
        self.paths.append(stored.path)
        return _SUCCESS


def _status(status: Dataset, what: str) -> int:
    """A response's status; an empty one means the association ended or timed out."""
    if "Status" not in status:
        raise SourceUnavailable(f"{what}: no answer (the association ended or timed out)")
    return int(status.Status)


class _TimeoutSession(requests.Session):
    """A session whose requests time out (dicomweb-client passes none)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(*args, **kwargs)


class _Dicomweb:
    """QIDO-RS, then WADO-RS, through dicomweb-client."""

    def __init__(self, source: RetrieveSource, store: InstanceStore, sender: Sender) -> None:
        from dicomweb_client.api import DICOMwebClient

        assert source.url is not None
        session = _TimeoutSession(source.timeout_s)
        session.verify = source.verify if isinstance(source.verify, bool) else str(source.verify)
        if source.token:
            session.headers["Authorization"] = f"Bearer {source.token}"
        self.client = DICOMwebClient(source.url, session=session)
        self.url = source.url
        self.store = store
        self.sender = sender
        self.stored = 0
        self.paths: list[Path] = []  # what it stored, for the audit trail

    @contextmanager
    def session(self) -> Iterator[None]:
        try:
            yield None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            message = f"{self.url} answered HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):
                raise SourceRefused(message) from exc
            raise SourceUnavailable(message) from exc
        except requests.RequestException as exc:
            raise SourceUnavailable(f"{self.url}: {type(exc).__name__}") from exc

    def find_studies(self, payload: RetrievalPayload) -> list[RemoteStudy]:
        """The patient's studies made within the payload's dates (QIDO-RS, PS3.18 10.6)."""
        filters = {"PatientID": payload.patient_id, "StudyDate": payload.dates}
        if payload.issuer:
            filters["IssuerOfPatientID"] = payload.issuer
        found = self.client.search_for_studies(search_filters=filters)
        return [
            RemoteStudy(
                str(_json_value(a, "0020000D") or ""),
                str(_json_value(a, "00080020") or ""),
                str(_json_value(a, "00080030") or ""),
            )
            for a in found
            if _json_value(a, "0020000D")
        ]

    def find(self, study_uid: str) -> list[RemoteSeries]:
        found = self.client.search_for_series(
            study_instance_uid=study_uid, fields=["NumberOfSeriesRelatedInstances"]
        )

        return [
            RemoteSeries(
                str(_json_value(a, "0020000E") or ""),
                str(_json_value(a, "00080060") or ""),
                _int(_json_value(a, "00200011")),
                _int(_json_value(a, "00201209")),
            )
            for a in found
            if _json_value(a, "0020000E")
        ]

    def fetch(self, study_uid: str, series: RemoteSeries) -> None:
        # Explicit VR Little Endian: the origin transcodes what it holds otherwise, and the
        # data set is stored as that transfer syntax says.
        for ds in self.client.iter_series(
            study_uid,
            series.series_uid,
            media_types=(("application/dicom", ExplicitVRLittleEndian),),
        ):
            stored = self.store.put(_encoded(ds), ExplicitVRLittleEndian, self.sender)
            self.stored += 1
            self.paths.append(stored.path)


def _json_value(attributes: dict[str, Any], tag: str) -> object:
    """An attribute's first value in the DICOM JSON model (PS3.18 F.2)."""
    values = attributes.get(tag, {}).get("Value") or [None]
    return values[0]


def _encoded(ds: Dataset) -> bytes:
    """The data set without its file meta, as Explicit VR Little Endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


class Retriever:
    """Runs retrieval jobs in a pool of threads, claimed by a background loop."""

    WORKER = "retriever"

    def __init__(
        self,
        config: NodeConfig,
        store: InstanceStore,
        *,
        events: Events | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.events = events
        self.settings = config.retrieve
        self.store = store
        self.db: Database = store.db
        self.jobs = job_store(store.db)
        self.clock = clock
        self.limits = {name: s.max_concurrent for name, s in self.settings.sources.items()}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, sum(self.limits.values())), thread_name_prefix="retrieve"
        )
        self._running: set[int] = set()
        self._lock = threading.Lock()
        self.loop = Loop("retriever", self._step, self.settings.poll_s)

    def backoff_s(self, attempts: int) -> float:
        """How long a retrieval waits after its ``attempts``-th failed attempt."""
        return min(
            self.settings.backoff_max_s,
            self.settings.backoff_initial_s * 2.0 ** max(0, attempts - 1),
        )

    def _step(self) -> bool:
        job = self.jobs.claim_retrieval(
            self.WORKER, concurrency=self.limits, retry_after=self.backoff_s
        )
        if job is None:
            return False
        with self._lock:
            self._running.add(job.id)
        self._pool.submit(self.run, job)
        return True

    def run(self, job: Job) -> None:
        """One attempt of a claimed job: retrieved and succeeded, or failed (queued again
        while attempts remain)."""
        try:
            self._attempt(job)
        except Exception as exc:
            # Its end could not be recorded (the database failed): the job stays running,
            # holding its study, until the node's next start queues it again.
            log.error("retrieval job %d: its end was not recorded: %s", job.id, reason(exc))
        finally:
            with self._lock:
                self._running.discard(job.id)
            self.loop.wake()  # the study's next retrieval, or the source's, may go now

    def _attempt(self, job: Job) -> None:
        try:
            stored = self.retrieve(job)
        except Exception as exc:
            permanent = isinstance(exc, Permanent)
            state = self.jobs.fail(
                job.id,
                reason(exc),
                worker=self.WORKER,
                max_attempts=1 if permanent else self.settings.max_attempts,
                token=job.token,
            )
            log.warning(
                "retrieval job %d (attempt %d) failed: %s%s",
                job.id,
                job.attempts,
                reason(exc),
                "" if state is not JobState.QUEUED else "; tried again after its backoff",
            )
            if state is JobState.FAILED:
                self._note(job)
        else:
            with self.db.transaction() as conn:
                held = self.jobs.holds(conn, job.id, self.WORKER, job.token)
                if held:
                    self.jobs.mark_succeeded(conn, job.id)
            if held:
                log.info("retrieval job %d succeeded: %d instance(s) came", job.id, stored)
                self._note(job)

    def _note(self, job: Job) -> None:
        """Add how the study's retrievals ended to the decision that asked for them."""
        asked = [
            j
            for j in self.jobs.recent(JobKind.RETRIEVE, subject_uids=[job.subject_uid])
            if j.generation == job.generation
        ]
        with self.db.transaction() as conn:
            note_retrievals(conn, job.subject_uid, job.generation, study_retrievals(conn, asked))

    def retrieve(self, job: Job) -> int:
        """Ask the job's source for the series of its study the index lacks and fetch them;
        how many instances were stored (C-MOVE: marked)."""
        payload = job.payload
        assert isinstance(payload, RetrievalPayload)
        source = self.settings.sources.get(payload.source)
        if source is None:
            raise SourceRefused(f"no source named {payload.source!r} under retrieve.sources")
        mark = retrieved_host(job.id)
        sender = Sender(source.ae_title or payload.source[:16], mark)
        started = self.clock()
        client: _Dimse | _Dicomweb
        if source.method == "dicomweb":
            client = _Dicomweb(source, self.store, sender)
        else:
            ours = self.settings.calling_ae_title or self.config.scp.ae_title
            client = _Dimse(
                source,
                ours,
                source.move_destination or self.config.scp.ae_title,
                self.store,
                sender,
            )
        try:
            with client.session():
                self._fetch(job, payload, client, source.method, started)
        finally:
            # C-MOVE's arrivals are audited by the SCP that received them.
            if client.paths and self.events is not None:
                self.events.emit(
                    StudiesReceived(
                        sender.calling_aet,
                        source.url or f"{source.host}:{source.port}",
                        self.settings.calling_ae_title or self.config.scp.ae_title,
                        study_refs(client.paths),
                        True,
                    )
                )
        return client.stored

    def _fetch(
        self,
        job: Job,
        payload: RetrievalPayload,
        client: _Dimse | _Dicomweb,
        method: str,
        started: float,
    ) -> None:
        """Inside the client's session: find the study's series, fetch those missing (for a
        prior: of the patient's most recent other study within the dates)."""
        study_uid: str | None = job.subject_uid
        if payload.prior:
            study_uid = latest_other(client.find_studies(payload), job.subject_uid)
            if study_uid is None:
                log.info("retrieval job %d: %s lists no prior study", job.id, payload.source)
                return
        assert study_uid is not None
        mark = retrieved_host(job.id)
        remote = client.find(study_uid)
        wanted = wanted_series(remote, set(study_series(self.db, study_uid)), payload.modalities)
        log.info(
            "retrieval job %d: study %s, %s lists %d series, %d to fetch by %s",
            job.id,
            store_key(study_uid)[:12],
            payload.source,
            len(remote),
            len(wanted),
            method,
        )
        for series in wanted:
            client.fetch(study_uid, series)
            if method == "c-move":
                client.stored += self._mark_moved(study_uid, series.series_uid, mark, started)
        self._await_completion([s.series_uid for s in wanted])

    def _await_completion(self, series_uids: list[str]) -> None:
        """Wait until the fetched series are complete (the association's release or the quiet
        timer), up to the quiet time and a margin: the job's end lets the study's decision
        go, and a prior is looked for among complete series only."""
        if not series_uids:
            return
        deadline = time.monotonic() + self.config.assembly.series_quiet_seconds + 30.0
        while time.monotonic() < deadline:
            with self.db.reading() as conn:
                row = conn.execute(
                    "SELECT COUNT(*) FROM series WHERE completed_at IS NULL"
                    " AND series_uid IN (SELECT value FROM json_each(?))",
                    (json.dumps(series_uids),),
                ).fetchone()
            if not row[0]:
                return
            time.sleep(0.2)

    def _mark_moved(self, study_uid: str, series_uid: str, mark: str, since: float) -> int:
        """Mark as retrieved what a C-MOVE brought through the SCP: the series' instances
        received since the attempt began."""
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE instances SET peer_host = ? WHERE study_uid = ? AND series_uid = ?"
                " AND received_at >= ?",
                (mark, study_uid, series_uid, since),
            )
        return cursor.rowcount

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        # An attempt in hand finishes (a C-GET stores what it was sent); a node stopped
        # before it ends finds it running at start-up and queues it again.
        self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["RemoteSeries", "Retriever", "wanted_series"]
