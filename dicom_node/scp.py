"""The DICOM listener: Verification and Storage SCP on pynetdicom's event handlers.

Association policy (PS3.8 7.1): the called AE title must be ours and, when an allow-list is
configured, the calling AE title (optionally bound to a host) must be on it; otherwise the
association is rejected with the PS3.8 Table 9-21 reason. C-STORE (PS3.4 B.2.3) writes the data
set exactly as received through :class:`~dicom_node.store.InstanceStore` and answers Success only
after it is durable.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
    register_uid,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.service_class import StorageServiceClass

# pynetdicom makes its SOP class constants (Verification) at import, out of type checkers'
# sight: https://github.com/pydicom/pynetdicom/issues/558
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    uid_to_service_class,
)

from dicom_node.assembly import Assembler
from dicom_node.compat.pynetdicom_server import AcceptorServer, start_acceptor
from dicom_node.config import ScpConfig, TlsConfig
from dicom_node.errors import InvalidInstance, OutOfResources, RejectedInstance, SopMismatch
from dicom_node.events import (
    AssociationAccepted,
    AssociationRejected,
    Events,
    InstanceReceived,
    StudiesReceived,
    StudyRef,
)
from dicom_node.priority import request_priority
from dicom_node.receive import Command, Context, Ending, FastAssociation, Sink
from dicom_node.store import (
    IncomingInstance,
    InstanceStore,
    Sender,
    StoredInstance,
    StoreResult,
    store_key,
)

log = logging.getLogger(__name__)

# C-STORE response statuses, PS3.4 B.2.3 and PS3.7 C.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21.
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)


@dataclass(frozen=True)
class PrivateStorageClass:
    """A private storage SOP class that no registry lists (PS3.5 9: a vendor's own UID root)."""

    keyword: str  # registered with pynetdicom under it (see _register_storage_classes)
    name: str  # in the conformance statement


# Private storage SOP classes real scanners send that pynetdicom does not list.
PRIVATE_STORAGE = {
    "1.3.12.2.1107.5.9.1": PrivateStorageClass(
        "SiemensCSANonImageStorage", "Siemens CSA Non-Image Storage"
    ),
    "1.2.840.113619.4.26": PrivateStorageClass(
        "GEPrivate3DModelStorage", "GE Private 3D Model Storage"
    ),
    "1.2.840.113619.4.30": PrivateStorageClass(
        "GEeNTEGRAProtocolOrNMGenieStorage", "GE eNTEGRA Protocol or NM Genie Storage"
    ),
    "1.3.46.670589.11.0.0.12.1": PrivateStorageClass(
        "PhilipsPrivateMRSpectrumStorage", "Philips Private MR Spectrum Storage"
    ),
    "1.3.46.670589.11.0.0.12.2": PrivateStorageClass(
        "PhilipsPrivateMRSeriesDataStorage", "Philips Private MR Series Data Storage"
    ),
}
PRIVATE_STORAGE_CLASSES = tuple(PRIVATE_STORAGE)

# Storage SOP classes retired from PS3.4 that pynetdicom does not list but old archives and
# ultrasound machines still send (PS3.6 Table A-1 lists them as retired; pydicom's registry
# names them, but has no constant for them).
RETIRED_STORAGE_CLASSES = (
    UID("1.2.840.10008.5.1.4.1.1.6"),  # Ultrasound Image Storage (Retired)
    UID("1.2.840.10008.5.1.4.1.1.3"),  # Ultrasound Multi-frame Image Storage (Retired)
)


def _register_storage_classes() -> None:
    """Bind every storage SOP class we accept to pynetdicom's Storage service class.

    pynetdicom serves a DIMSE request by the service class of its context's SOP class
    (``uid_to_service_class``); for a UID it does not know that is the bare ``ServiceClass``,
    which cannot serve C-STORE, and the association is aborted at the first such request with
    nothing after it stored. Registering the UID makes the request reach our C-STORE handler.
    """
    keywords: dict[str, str] = {
        **{uid: uid.keyword for uid in RETIRED_STORAGE_CLASSES},
        **{uid: private.keyword for uid, private in PRIVATE_STORAGE.items()},
    }
    for uid, keyword in keywords.items():
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)


_register_storage_classes()


# Never-lossy encodings, preferred when a requestor offers several in one context: the sender
# then keeps its own lossless encoding instead of expanding or re-coding it. Those pydicom 3.0
# has no constant for are spelt out; pynetdicom accepts them once it lists them.
LOSSLESS_COMPRESSED = (
    JPEGLossless,  # Process 14
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,  # JPEG 2000 Part 2
    UID("1.2.840.10008.1.2.4.110"),  # JPEG XL Lossless
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    UID("1.2.840.10008.1.2.8.1"),  # Deflated Image Frame Compression
)
UNCOMPRESSED = (
    ExplicitVRLittleEndian,  # keeps VRs, so before Implicit
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, still sent by old modalities
    ImplicitVRLittleEndian,  # the default every SCU must offer
)


# Retired JPEG processes (PS3.5 Table A-1, retired in 2006) that pynetdicom no longer lists but
# archives still hold and send: 1.2.840.10008.1.2.4.52 to .66 except .57 (listed above);
# pydicom's registry names them, but has no constant for them.
RETIRED_JPEG = tuple(UID(f"1.2.840.10008.1.2.4.{n}") for n in range(52, 67) if n != 57)


def accepted_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows, in the order we prefer them.

    pynetdicom accepts, per presentation context, the first of *our* syntaxes that the
    requestor proposed. Lossless encodings come first, then the uncompressed ones; lossy
    syntaxes come last so that a sender offering lossy and lossless for the same data is never
    asked to compress it lossily. Data already lossy can still be sent as it is.
    """
    preferred = [str(ts) for ts in (*LOSSLESS_COMPRESSED, *UNCOMPRESSED)]
    known = [str(ts) for ts in ALL_TRANSFER_SYNTAXES]
    rest = [ts for ts in known if ts not in preferred]
    return [ts for ts in preferred if ts in known] + rest + [str(ts) for ts in RETIRED_JPEG]


def refusal_status(exc: Exception) -> int:
    """The C-STORE failure status (PS3.4 B.2.3) for why an instance was not stored."""
    if isinstance(exc, SopMismatch):
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InvalidInstance):
        return STATUS_CANNOT_UNDERSTAND
    # Out of disk, or the store could not write: the sender should retry later.
    return STATUS_OUT_OF_RESOURCES


def storage_sop_classes() -> list[str]:
    """Every storage SOP class the SCP accepts: pynetdicom's, the retired ones archives
    still send, then the private ones."""
    return [
        *(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts),
        *(str(uid) for uid in RETIRED_STORAGE_CLASSES),
        *PRIVATE_STORAGE_CLASSES,
    ]


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS context for the listener (PS3.15 B.1 Basic TLS Secure Transport)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        context.load_verify_locations(str(tls.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def _peer(assoc: Association) -> Sender:
    return Sender(
        calling_aet=assoc.requestor.primitive.calling_ae_title.strip()
        if assoc.requestor.primitive
        else assoc.requestor.ae_title.strip(),
        peer_host=str(assoc.requestor.address),
    )


def _called(assoc: Association) -> str:
    primitive = assoc.requestor.primitive
    return primitive.called_ae_title.strip() if primitive else assoc.acceptor.ae_title.strip()


class StorageSCP:
    """Owns the pynetdicom AE and routes its events to the store and the assembler."""

    def __init__(
        self,
        config: ScpConfig,
        store: InstanceStore,
        assembler: Assembler,
        events: Events | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.assembler = assembler
        self.events = events or Events()
        # Per association: study UID -> (patient ID, instances), reported when it ends.
        self._received: dict[int, dict[str, tuple[str | None, int]]] = {}
        # Established associations whose end has not been handled yet, by the number the
        # log gives them (#1, #2, ... since start) so that its lines about one can be told.
        self._open: dict[int, int] = {}
        self._numbered = 0
        # Associations the fast path serves, to abort them when the node stops.
        self._fast: dict[int, FastAssociation] = {}
        self._received_lock = threading.Lock()
        self.ae = self._build_ae()
        self._server: AcceptorServer | None = None
        if config.allowed_calling_aets is None:
            log.warning(
                "scp.allowed_calling_aets is not set: any calling AE may store to this node"
            )

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.network_timeout = self.config.network_timeout_s
        ae.require_called_aet = self.config.require_called_aet
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(Verification, syntaxes)
        for sop_class in storage_sop_classes():
            # The rule: a context we accept is one we can store in (PS3.4 B.2.2).
            if uid_to_service_class(sop_class) is not StorageServiceClass:
                raise RuntimeError(f"storage SOP class {sop_class} has no Storage service")
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    @property
    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ASYNC_OPS, self._on_async_ops),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound (host, port)."""
        context = server_ssl_context(self.config.tls) if self.config.tls.enabled else None
        server = start_acceptor(
            self.ae,
            (self.config.host, self.config.port),
            evt_handlers=self.handlers,
            ssl_context=context,
            on_association_end=self._on_finished,
            on_tls_failure=self._on_tls_failure,
            fast_path=self._serve_fast if self.config.fast_path else None,
        )
        self._server = server
        host, port = server.server_address[:2]
        log.info(
            "listening as %s on %s:%d%s",
            self.config.ae_title,
            host,
            port,
            " (TLS)" if context else "",
        )
        return host, port

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish for up to ``grace_s``, then abort.
        A connection whose association was never accepted holds nothing: it is not waited
        for (a peer that connected and said nothing would otherwise hold the stop for
        ``scp.acse_timeout_s``)."""
        if self._server is None:
            return
        with self._received_lock:
            established = set(self._open)
        active = [a for a in self._server.active_associations if id(a) in established]
        self._server.shutdown()
        deadline = time.monotonic() + grace_s
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                log.warning("aborting an association still open after %.0f s", grace_s)
                with self._received_lock:
                    session = self._fast.get(id(assoc))
                if session is not None:
                    session.abort()
                    assoc.join(5.0)
                else:
                    assoc.abort()
        self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    # -- handlers ------------------------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        sender = _peer(event.assoc)
        if not self.config.admits(sender.calling_aet, sender.peer_host):
            log.warning(
                "rejected association from calling AE %r at %s: not in scp.allowed_calling_aets",
                sender.calling_aet,
                sender.peer_host,
            )
            self.events.emit(
                AssociationRejected(
                    sender.calling_aet,
                    sender.peer_host,
                    _called(event.assoc),
                    "calling AE title not recognised (scp.allowed_calling_aets)",
                )
            )
            # How pynetdicom's maintainers reject from an EVT_REQUESTED handler: pynetdicom then
            # skips its own negotiation (https://github.com/pydicom/pynetdicom/issues/408).
            event.assoc.acse.send_reject(*REJECT_CALLING_AE_NOT_RECOGNIZED)
            # As pynetdicom's own rejections do: kill() lets the DUL flush the A-ASSOCIATE-RJ
            # before the socket is closed, so the peer reads a rejection, not an abort.
            event.assoc.kill()

    def _on_rejected(self, event: Event) -> None:
        """pynetdicom's own rejections (PS3.8 9.3.4): called AE title, association limit."""
        sender = _peer(event.assoc)
        called = _called(event.assoc)
        if self.config.require_called_aet and called != self.config.ae_title:
            reason = f"called AE title {called!r} is not ours"
        else:
            reason = f"more than scp.max_associations ({self.config.max_associations}) open"
        log.warning(
            "rejected association from %s at %s: %s", sender.calling_aet, sender.peer_host, reason
        )
        self.events.emit(AssociationRejected(sender.calling_aet, sender.peer_host, called, reason))

    def _on_tls_failure(self, host: str, why: str) -> None:
        log.warning("TLS handshake with %s failed: %s", host, why)
        # No association yet: neither AE title is known (PS3.15 A.5.3.12 names the node).
        self.events.emit(AssociationRejected("", host, "", f"TLS handshake failed: {why}"))

    def _on_established(self, event: Event) -> None:
        sender = _peer(event.assoc)
        with self._received_lock:
            self._numbered += 1
            number = self._open[id(event.assoc)] = self._numbered
        log.info(
            "association from %s at %s accepted (#%d)",
            sender.calling_aet,
            sender.peer_host,
            number,
        )
        self.events.emit(
            AssociationAccepted(sender.calling_aet, sender.peer_host, _called(event.assoc))
        )
        self.assembler.association_opened(id(event.assoc))

    def _association(self, assoc: Association) -> str:
        """An association in the log: its number, calling AE title and peer address."""
        sender = _peer(assoc)
        with self._received_lock:
            number = self._open.get(id(assoc))
        numbered = f"#{number} " if number is not None else ""
        return f"association {numbered}from {sender.calling_aet} at {sender.peer_host}"

    def _on_echo(self, event: Event) -> int:
        return STATUS_SUCCESS

    def _on_async_ops(self, event: Event) -> tuple[int, int]:
        """One operation at a time each way (PS3.7 D.3.3.3): answered explicitly, so that a
        peer asking for more knows it got one."""
        return 1, 1

    def _on_store(self, event: Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)  # what EVT_C_STORE carries
        context = event.context
        encoded = event.encoded_dataset(include_meta=False)
        try:
            stored = self.store.put(
                encoded,
                context.transfer_syntax,
                _peer(event.assoc),
                expected_sop_class_uid=str(request.AffectedSOPClassUID),
                expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
                request_priority=request_priority(request.Priority),
            )
        except (RejectedInstance, OSError) as exc:
            return self._refused(
                event.assoc, exc, str(request.AffectedSOPInstanceUID), len(encoded)
            )
        return self._accepted(event.assoc, stored, len(encoded))

    def _refused(
        self,
        assoc: Association,
        exc: Exception,
        sop_instance_uid: str,
        size: int,
        *,
        fast_path: bool = False,
    ) -> int:
        """Account for a C-STORE that stored nothing; its failure status."""
        status = refusal_status(exc)
        # Which instance as a hash of the request's UID (as named on disk), never the UID.
        log.error(
            "C-STORE refused with 0x%04X, nothing stored: %s (instance %s, %s)",
            status,
            exc,
            store_key(sop_instance_uid)[:12],
            self._association(assoc),
        )
        self.events.emit(InstanceReceived(stored=False, size=size, fast_path=fast_path))
        return status

    def _accepted(
        self, assoc: Association, stored: StoredInstance, size: int, *, fast_path: bool = False
    ) -> int:
        """Account for a stored instance (or a repeat of one); Success."""
        if stored.result is not StoreResult.STORED:
            log.info(
                "repeated SOP instance %s (%s)",
                store_key(stored.header.sop_instance_uid)[:12],
                stored.result.value,
            )
        log.debug("stored %s at %s", stored.header.sop_instance_uid, stored.path)
        self.assembler.instance_stored(id(assoc), stored)
        self.events.emit(InstanceReceived(stored=True, size=size, fast_path=fast_path))
        with self._received_lock:
            studies = self._received.setdefault(id(assoc), {})
            patient_id, instances = studies.get(
                stored.header.study_uid, (stored.header.patient_id, 0)
            )
            studies[stored.header.study_uid] = (patient_id, instances + 1)
        return STATUS_SUCCESS

    def _serve_fast(self, assoc: Association, connection: socket.socket, max_pdu: int) -> None:
        """Serve an accepted association's P-DATA on :mod:`dicom_node.receive`'s fast path."""
        sender = _peer(assoc)
        session = FastAssociation(
            connection,
            (
                Context(cx.context_id, str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
                if cx.context_id is not None and cx.transfer_syntax
            ),
            _AssociationService(self, assoc, sender),
            peer_max_pdu=assoc.requestor.maximum_length or 0,
            max_pdu=max_pdu,
            network_timeout_s=self.config.network_timeout_s,
            name=self._association(assoc),
        )
        with self._received_lock:
            self._fast[id(assoc)] = session
        try:
            ending = session.run()
        finally:
            with self._received_lock:
                self._fast.pop(id(assoc), None)
        if ending is Ending.RELEASED:
            self._ended(assoc, released=True)
        else:
            self._aborted(assoc)

    def _on_released(self, event: Event) -> None:
        self._ended(event.assoc, released=True)

    def _on_aborted(self, event: Event) -> None:
        self._aborted(event.assoc)

    def _aborted(self, assoc: Association) -> None:
        number = self._open.get(id(assoc), 0)
        log.warning("association from %s aborted (#%d)", _peer(assoc).calling_aet, number)
        self._ended(assoc, released=False)

    def _on_finished(self, assoc: Association) -> None:
        """Every association's last word, after its thread ended, however it ended."""
        if not self.listening:
            return  # stopping: stop() aborted what was open, and the store may be closed
        if self._ended(assoc, released=False):
            log.warning(
                "association from %s ended without a release or an abort (a malformed PDU)",
                _peer(assoc).calling_aet,
            )

    def _ended(self, assoc: Association, *, released: bool) -> bool:
        """Close the books on an established association once; False when already closed."""
        with self._received_lock:
            if self._open.pop(id(assoc), None) is None:
                return False
            studies = self._received.pop(id(assoc), {})
        self.assembler.association_ended(id(assoc), released=released)
        self._report_received(assoc, studies, released=released)
        return True

    def _report_received(
        self, assoc: Association, studies: dict[str, tuple[str | None, int]], *, released: bool
    ) -> None:
        if studies:
            sender = _peer(assoc)
            self.events.emit(
                StudiesReceived(
                    sender.calling_aet,
                    sender.peer_host,
                    _called(assoc),
                    tuple(StudyRef(uid, p, n) for uid, (p, n) in studies.items()),
                    released,
                )
            )


class _AssociationService:
    """The fast path's requests on one association, served by its :class:`StorageSCP`."""

    def __init__(self, scp: StorageSCP, assoc: Association, sender: Sender) -> None:
        self.scp = scp
        self.assoc = assoc
        self.sender = sender

    def store(self, context: Context, command: Command) -> Sink:
        try:
            priority = request_priority(command.priority)
        except ValueError as exc:
            return _StoreSink(self, command, None, InvalidInstance(str(exc)))
        try:
            incoming = self.scp.store.incoming(
                context.transfer_syntax,
                self.sender,
                command.affected_sop_class,
                command.affected_sop_instance,
                request_priority=priority,
            )
        except (RejectedInstance, OSError) as exc:
            return _StoreSink(self, command, None, exc)
        return _StoreSink(self, command, incoming, None)

    def echo(self) -> int:
        return STATUS_SUCCESS


class _StoreSink:
    """A C-STORE's data set on its way to the store; a refused one is read and dropped."""

    def __init__(
        self,
        service: _AssociationService,
        command: Command,
        incoming: IncomingInstance | None,
        refusal: Exception | None,
    ) -> None:
        self.service = service
        self.command = command
        self.incoming = incoming
        self.refusal = refusal
        self.size = 0

    def write(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        if self.incoming is None:
            return
        try:
            self.incoming.write(fragment)
        except OSError as exc:  # the disk filled: the rest is read and dropped
            self.refusal = exc
            self.discard()

    def close(self) -> int:
        scp, assoc = self.service.scp, self.service.assoc
        if self.incoming is not None:
            try:
                stored = self.incoming.finish()
            except (RejectedInstance, OSError) as exc:
                self.refusal = exc
            except Exception as exc:  # a bug: the sender still gets an answer it can retry
                log.debug("storing failed unexpectedly", exc_info=True)
                # Named by its type only: its message may quote the data set.
                self.refusal = OutOfResources(f"storing failed ({type(exc).__name__})")
            finally:
                self.discard()
        if self.refusal is not None:
            return scp._refused(
                assoc,
                self.refusal,
                self.command.affected_sop_instance,
                self.size,
                fast_path=True,
            )
        return scp._accepted(assoc, stored, self.size, fast_path=True)

    def discard(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None
