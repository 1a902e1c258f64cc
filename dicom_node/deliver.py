"""Delivery: each job's results reach every destination its route names, exactly once.

A delivery is durable state per job and destination (kept by the job store,
:mod:`dicom_node.jobs`), created in the transaction that records the job's results:
``pending`` until the destination confirmed every object, then ``sent``; a failed attempt
waits with exponential backoff and jitter, and after ``delivery.max_attempts`` the delivery
is ``dead`` with its last error, until a person replays it (``dicom-node jobs retry``). A
permanent association rejection (PS3.8 7.1.1.9, e.g. our AE title unknown to the PACS) and a
missing peer are dead at once: trying again in a loop would only fill the PACS's log. A
restarted node resumes what is pending.

Every attempt sends the stored files, the same SOP Instance UIDs, never regenerated ones, so a
PACS that got an object twice (it acknowledged, then the link dropped before we recorded it)
holds it once.

Notification destinations (``webhook``, ``hl7``, ``fhir``) go through the same states: each
attempt reads the job's delivered objects into a report (:mod:`dicom_node.notify`) and sends it
with the protocol's module, under a key that is the same on every attempt (the webhook's
idempotency key, the HL7 message control ID, the FHIR identifiers), so a receiver told twice
knows it. A destination's ``notify`` rule may leave a result out: its delivery is then closed
as sent with no message.

Retention (:mod:`dicom_node.retention`), which waits for the deliveries this module records,
runs in a loop of its own, so that a slow purge never holds deliveries back.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import (
    SENDER,
    ClientTlsConfig,
    DeliveryConfig,
    DicomDestination,
    DicomwebDestination,
    FhirDestination,
    FolderDestination,
    Hl7Destination,
    NodeConfig,
    NotifyDestination,
    WebhookDestination,
)
from dicom_node.database import Database
from dicom_node.errors import (
    AssociationFailed,
    AssociationRejected,
    DeliveryError,
    DestinationRefused,
    DestinationUnavailable,
    ObjectMissing,
    SendAbandoned,
)
from dicom_node.events import DeliveryAttempted, Events, study_refs
from dicom_node.jobs import Delivery, job_store
from dicom_node.loops import Loop
from dicom_node.notify import ResultObject, build_report, selected
from dicom_node.scu import send
from dicom_node.store import fsync_dir

if TYPE_CHECKING:
    from dicom_node.objects import ObjectStore

log = logging.getLogger(__name__)

Target = (
    DicomDestination
    | DicomwebDestination
    | FolderDestination
    | WebhookDestination
    | Hl7Destination
    | FhirDestination
)


def backoff_s(attempts: int, config: DeliveryConfig, rng: random.Random) -> float:
    """Wait before the next try after ``attempts`` failures: doubling from the initial wait up
    to the maximum, spread by the jitter so that many deliveries do not retry in step."""
    base = min(config.backoff_max_s, config.backoff_initial_s * 2.0 ** max(attempts - 1, 0))
    return base * (1.0 + config.backoff_jitter * rng.uniform(-1.0, 1.0))


def target_label(target: Target) -> str:
    """Where a target is, for a person and the audit trail: AE@host:port, a URL, a folder."""
    if isinstance(target, DicomDestination):
        return f"{target.ae_title}@{target.host}:{target.port}"
    if isinstance(target, (DicomwebDestination, WebhookDestination, FhirDestination)):
        return target.url
    if isinstance(target, Hl7Destination):
        return f"{target.receiving_application}@{target.host}:{target.port}"
    return str(target.path)


def resolve(config: NodeConfig, delivery: Delivery) -> Target:
    """The destination as configured now, so that a fixed config applies to a replay."""
    if delivery.destination == SENDER:
        peer = config.peers.get(delivery.peer_aet)
        if peer is None:
            raise DestinationRefused(
                f"the calling AE {delivery.peer_aet!r} is not under 'peers': add its host and"
                " port, then run 'dicom-node jobs retry'"
            )
        return DicomDestination(
            ae_title=delivery.peer_aet, host=peer.host, port=peer.port, tls=peer.tls
        )
    target = config.destinations.get(delivery.destination)
    if target is None:
        raise DestinationRefused(
            f"no destination named {delivery.destination!r} in the configuration"
        )
    return target


def _client_tls(tls: ClientTlsConfig | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    if tls is None:
        return None
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls.ca_file is not None else None
    )
    if tls.cert_file is not None:
        context.load_cert_chain(
            str(tls.cert_file), str(tls.key_file) if tls.key_file is not None else None
        )
    return context, tls.server_hostname or host


def requests_verify(verify: bool | Path) -> bool | str:
    """A destination's ``verify`` setting as requests takes it: a flag, or a CA bundle's path."""
    return str(verify) if isinstance(verify, Path) else verify


def http_status_error(what: str, status: int) -> DeliveryError:
    """A notification's HTTP answer other than success: retried after a timeout (408), a rate
    limit (429) or a server error (5xx); any other answer would be the same on a retry."""
    retried = status in (408, 429) or status >= 500
    return DeliveryError.of(f"{what}: HTTP {status}", permanent=not retried)


def send_dicom(
    target: DicomDestination, files: Sequence[Path], calling_aet: str, timeout_s: float
) -> dict[Path, str | None]:
    """C-STORE ``files`` in one association per 128 contexts; per file: None (stored, or
    stored with a warning) or why it failed. Association problems raise DeliveryError."""
    try:
        report = send(
            files,
            target.host,
            target.port,
            calling_aet=calling_aet,
            called_aet=target.ae_title,
            timeout_s=timeout_s,
            tls=_client_tls(target.tls, target.host),
        )
    except (AssociationRejected, SendAbandoned) as exc:
        raise DeliveryError.of(str(exc), permanent=exc.permanent) from exc
    except (AssociationFailed, OSError) as exc:
        raise DestinationUnavailable(str(exc) or type(exc).__name__) from exc
    outcome: dict[Path, str | None] = {path: None for path in report.sent}
    outcome.update({path: why for path, why in [*report.failed, *report.skipped]})
    return outcome


def send_dicomweb(target: DicomwebDestination, files: Sequence[Path], timeout_s: float) -> None:
    """STOW-RS (PS3.18 10.5) of ``files`` in one request; any instance not stored fails it."""
    import requests
    from dicomweb_client import DICOMwebClient
    from pydicom import dcmread

    session = requests.Session()
    if target.username is not None:
        session.auth = (target.username, target.password or "")
    if target.token:
        session.headers["Authorization"] = f"Bearer {target.token}"
    session.verify = requests_verify(target.verify)
    client = DICOMwebClient(target.url, session=session, timeout=timeout_s)
    try:
        response = client.store_instances([dcmread(path) for path in files])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        # Client errors other than a timeout, a conflict or a rate limit repeat on a retry.
        permanent = 400 <= status < 500 and status not in (408, 409, 429)
        raise DeliveryError.of(
            f"STOW-RS to {target.url}: HTTP {status}", permanent=permanent
        ) from exc
    except requests.RequestException as exc:
        raise DestinationUnavailable(
            f"STOW-RS to {target.url}: {type(exc).__name__}: {exc}"
        ) from exc
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
        raise DestinationUnavailable(
            f"STOW-RS to {target.url}: {len(failed)} instance(s) not stored ({', '.join(reasons)})"
        )


def send_to_folder(target: FolderDestination, files: Sequence[Path]) -> None:
    """Copy ``files`` to <folder>/<study>/<series>/<instance>.dcm, each complete or absent:
    written beside, synced, then renamed, so a system picking files up never sees half."""
    from pydicom import dcmread

    try:
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            folder = target.path / ds.StudyInstanceUID / ds.SeriesInstanceUID
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"{ds.SOPInstanceUID}.dcm"
            partial = folder / f".{ds.SOPInstanceUID}.partial"
            with path.open("rb") as source, partial.open("wb") as copy:
                shutil.copyfileobj(source, copy)
                copy.flush()
                os.fsync(copy.fileno())
            os.replace(partial, final)
            fsync_dir(folder)
    except OSError as exc:
        raise DestinationUnavailable(f"folder {target.path}: {exc}") from exc


class Deliverer:
    """Sends due deliveries, in a background loop of ``serve`` (:mod:`dicom_node.loops`)."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        data_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        events: Events | None = None,
        objects: ObjectStore | None = None,
    ) -> None:
        self.config = config
        # Cluster mode: results are written on worker hosts and recorded at their object
        # store keys (the same relative paths); each file is fetched here on first send.
        self.objects = objects
        self.events = events or Events()
        self.db = db
        self.jobs = job_store(db)
        self.data_dir = data_dir
        self.clock = clock
        self.rng = rng or random.Random()
        self.calling_aet = config.delivery.calling_ae_title or config.scp.ae_title
        self.loop = Loop("deliverer", self.run_once, config.delivery.poll_s)

    def due(self) -> list[Delivery]:
        return self.jobs.due_deliveries(self.clock())

    def files(self, job_id: int) -> list[Path]:
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT path FROM outputs WHERE job_id = ? ORDER BY kind, sop_instance_uid",
                (job_id,),
            ).fetchall()
        relatives = [str(r["path"]) for r in rows]
        if self.objects is None:
            return [self.data_dir / relative for relative in relatives]
        from dicom_node.staging import materialize_all

        try:
            return materialize_all(relatives, self.data_dir, self.objects)
        except ObjectMissing:  # purged from the object store: as gone as a deleted file
            return []

    def deliver_due(self) -> int:
        """Make one attempt at every due delivery; the number attempted.

        Deliveries due to the same DICOM destination share one association."""
        due = self.due()
        by_target: dict[str, list[tuple[Delivery, Target]]] = {}
        for delivery in due:
            try:
                target = resolve(self.config, delivery)
            except DeliveryError as exc:
                self._failed(delivery, exc, delivery.label)
                continue
            # DICOM destinations share an association; the others go one delivery at a time.
            key = (
                target.model_dump_json()
                if isinstance(target, DicomDestination)
                else f"#{delivery.id}"
            )
            by_target.setdefault(key, []).append((delivery, target))
        for group in by_target.values():
            self._attempt(group)
        return len(due)

    def _attempt(self, group: list[tuple[Delivery, Target]]) -> None:
        files: dict[int, list[Path]] = {}
        target = group[0][1]
        where = target_label(target)
        for delivery, _ in group:
            files[delivery.id] = self.files(delivery.job_id)
            missing = [p for p in files[delivery.id] if not p.is_file()]
            if missing or not files[delivery.id]:
                self._failed(
                    delivery,
                    DestinationRefused(
                        f"job {delivery.job_id}'s result files are gone (purged by retention?)"
                    ),
                    where,
                )
                files.pop(delivery.id)
        group = [(d, t) for d, t in group if d.id in files]
        if not group:
            return
        timeout_s = self.config.delivery.timeout_s
        try:
            if isinstance(target, DicomDestination):
                everything = [p for d, _ in group for p in files[d.id]]
                outcome = send_dicom(target, everything, self.calling_aet, timeout_s)
                for delivery, _ in group:
                    problems = [
                        f"{p.name}: {why}"
                        for p in files[delivery.id]
                        if (why := outcome.get(p, "not sent")) is not None
                    ]
                    if problems:
                        self._failed(delivery, DestinationUnavailable("; ".join(problems)), where)
                    else:
                        self._sent(delivery, files[delivery.id], where)
                return
            ((delivery, _),) = group
            if isinstance(target, DicomwebDestination):
                send_dicomweb(target, files[delivery.id], timeout_s)
            elif isinstance(target, FolderDestination):
                send_to_folder(target, files[delivery.id])
            elif not self._notify(delivery, target, files[delivery.id]):
                return
            self._sent(delivery, files[delivery.id], where)
        except DeliveryError as exc:
            for delivery, _ in group:
                self._failed(delivery, exc, where)

    def _objects(self, job_id: int, files: list[Path]) -> list[ResultObject]:
        """The job's result objects, beside the files :meth:`files` gave (in its order)."""
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT kind, sop_class_uid, sop_instance_uid, series_uid FROM outputs"
                " WHERE job_id = ? ORDER BY kind, sop_instance_uid",
                (job_id,),
            ).fetchall()
        return [
            ResultObject(r["kind"], r["sop_class_uid"], r["sop_instance_uid"], r["series_uid"], p)
            for r, p in zip(rows, files, strict=True)
        ]

    def _source(self, series_uids: list[str]) -> Path | None:
        """An instance of the job's input as it was received, for the patient's identity."""
        with self.db.reading() as conn:
            for uid in series_uids:
                row = conn.execute(
                    "SELECT path FROM instances WHERE series_uid = ? ORDER BY path LIMIT 1",
                    (uid,),
                ).fetchone()
                path = self.data_dir / str(row["path"]) if row is not None else None
                if path is not None and path.is_file():
                    return path
        return None

    def _notify(self, delivery: Delivery, target: NotifyDestination, files: list[Path]) -> bool:
        """Tell a notification destination of the job's results; False when its rule leaves
        them out (the delivery is closed as sent, with no message and no attempt audited)."""
        job = self.jobs.get(delivery.job_id)
        if job is None:
            raise DestinationRefused(f"job {delivery.job_id} is not in the job store")
        payload = job.inference
        report = build_report(
            job_id=job.id,
            destination=delivery.destination,
            job_algorithm=payload.algorithm,
            job_priority=job.priority,
            objects=self._objects(job.id, files),
            source=self._source(list(payload.inputs.values())),
            node_ae_title=self.config.scp.ae_title,
            rule=target.notify,
        )
        if not selected(target.notify, report.algorithm, job.priority, report.positive):
            self.jobs.delivery_sent(delivery.id, self.clock())
            log.info(
                "job %d: not notified to %s (its notify rule leaves the result out)",
                delivery.job_id,
                delivery.label,
            )
            return False
        timeout_s = self.config.delivery.timeout_s
        if isinstance(target, WebhookDestination):
            from dicom_node.notify_webhook import send_webhook

            send_webhook(target, report, timeout_s)
        elif isinstance(target, Hl7Destination):
            from dicom_node.notify_hl7 import send_hl7

            send_hl7(target, report, attempt=delivery.attempts + 1)
        else:
            from dicom_node.notify_fhir import send_fhir

            send_fhir(target, report, timeout_s)
        return True

    def _sent(self, delivery: Delivery, files: list[Path], where: str) -> None:
        count = len(files)
        self.jobs.delivery_sent(delivery.id, self.clock())
        log.info("job %d: %d object(s) delivered to %s", delivery.job_id, count, delivery.label)
        self.events.emit(DeliveryAttempted(delivery.destination, where, study_refs(files), ok=True))

    def _failed(self, delivery: Delivery, error: DeliveryError, where: str) -> None:
        attempts = delivery.attempts + 1
        dead = error.permanent or attempts >= self.config.delivery.max_attempts
        wait = 0.0 if dead else backoff_s(attempts, self.config.delivery, self.rng)
        self.jobs.delivery_failed(
            delivery.id,
            attempts=attempts,
            error=str(error),
            dead=dead,
            next_attempt_at=self.clock() + wait,
        )
        if dead:
            log.error(
                "job %d: delivery to %s is a dead letter after %d attempt(s): %s"
                " (replay: dicom-node jobs retry %d)",
                delivery.job_id,
                delivery.label,
                attempts,
                error,
                delivery.job_id,
            )
        else:
            log.warning(
                "job %d: delivery to %s failed (attempt %d, next in %.0f s): %s",
                delivery.job_id,
                delivery.label,
                attempts,
                wait,
                error,
            )
        self.events.emit(
            DeliveryAttempted(
                delivery.destination,
                where,
                study_refs(self.files(delivery.job_id)),
                ok=False,
                dead=dead,
                error=str(error),
            )
        )

    def run_once(self) -> None:
        self.deliver_due()

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
