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
from collections.abc import Callable
from typing import cast

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
    register_uid,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.assembly import Assembler
from dicom_node.config import ScpConfig, TlsConfig
from dicom_node.events import (
    AssociationAccepted,
    AssociationRejected,
    Events,
    InstanceReceived,
    StudiesReceived,
    StudyRef,
)
from dicom_node.store import (
    InstanceStore,
    InvalidInstance,
    RejectedInstance,
    Sender,
    SopMismatch,
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

# Private storage SOP classes real scanners send that pynetdicom does not list, with the
# keyword each is registered under in pynetdicom (see _register_storage_classes).
_PRIVATE_STORAGE_KEYWORDS = {
    "1.3.12.2.1107.5.9.1": "SiemensCSANonImageStorage",
    "1.2.840.113619.4.26": "GEPrivate3DModelStorage",
    "1.2.840.113619.4.30": "GEeNTEGRAProtocolOrNMGenieStorage",
    "1.3.46.670589.11.0.0.12.1": "PhilipsPrivateMRSpectrumStorage",
    "1.3.46.670589.11.0.0.12.2": "PhilipsPrivateMRSeriesDataStorage",
}
PRIVATE_STORAGE_CLASSES = tuple(_PRIVATE_STORAGE_KEYWORDS)

# Storage SOP classes retired from PS3.4 that pynetdicom does not list but old archives and
# ultrasound machines still send (PS3.6 Table A-1 lists them as retired).
_RETIRED_STORAGE_KEYWORDS = {
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
}
RETIRED_STORAGE_CLASSES = tuple(_RETIRED_STORAGE_KEYWORDS)


def _register_storage_classes() -> None:
    """Bind every storage SOP class we accept to pynetdicom's Storage service class.

    pynetdicom serves a DIMSE request by the service class of its context's SOP class
    (``uid_to_service_class``); for a UID it does not know that is the bare ``ServiceClass``,
    which cannot serve C-STORE, and the association is aborted at the first such request with
    nothing after it stored. Registering the UID makes the request reach our C-STORE handler.
    """
    for uid, keyword in {**_RETIRED_STORAGE_KEYWORDS, **_PRIVATE_STORAGE_KEYWORDS}.items():
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)


_register_storage_classes()


# Never-lossy encodings, preferred when a requestor offers several in one context: the sender
# then keeps its own lossless encoding instead of expanding or re-coding it.
LOSSLESS_COMPRESSED = (
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Process 14
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless Only
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless Only
    "1.2.840.10008.1.2.4.202",  # HTJ2K RPCL Lossless Only
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
)
UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian: keeps VRs, so before Implicit
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2",  # Implicit VR Little Endian, the default every SCU must offer
)


# Retired JPEG processes (PS3.5 Table A-1, retired in 2006) that pynetdicom no longer lists but
# archives still hold and send: 1.2.840.10008.1.2.4.52 to .66 except .57 (listed above).
RETIRED_JPEG = tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(52, 67) if n != 57)


def accepted_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows, in the order we prefer them.

    pynetdicom accepts, per presentation context, the first of *our* syntaxes that the
    requestor proposed. Lossless encodings come first, then the uncompressed ones; lossy
    syntaxes come last so that a sender offering lossy and lossless for the same data is never
    asked to compress it lossily. Data already lossy can still be sent as it is.
    """
    preferred = [*LOSSLESS_COMPRESSED, *UNCOMPRESSED]
    known = [str(ts) for ts in ALL_TRANSFER_SYNTAXES]
    rest = [ts for ts in known if ts not in preferred]
    return [ts for ts in preferred if ts in known] + rest + list(RETIRED_JPEG)


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
        *RETIRED_STORAGE_CLASSES,
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


# The most an A-ASSOCIATE-RQ (or any PDU but P-DATA-TF) needs: 128 presentation contexts with
# every transfer syntax, and user identity items of 64 KiB each (PS3.8 9.3.2, PS3.7 D.3.3.7).
PDU_ALLOWANCE = 1 << 20


class _BoundedSocket(AssociationSocket):
    """pynetdicom reads a PDU into memory whole, at whatever length its header announces (up
    to 4 GiB, PS3.8 9.3.1): a peer streaming one could exhaust the node's memory. A PDU
    longer than ``limit`` is not read; to pynetdicom the transport closed."""

    limit: int

    @classmethod
    def bound(cls, sock: AssociationSocket, limit: int) -> None:
        """Give the socket pynetdicom made the bound. Made anew, it would announce the
        connection to the protocol machine a second time."""
        sock.__class__ = cls
        cast(_BoundedSocket, sock).limit = limit

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.limit:
            log.warning(
                "%s announced a PDU of %d bytes, more than the %d this node reads"
                " (scp.max_pdu_size); connection closed",
                self._assoc.requestor.address,
                nr_bytes,
                self.limit,
            )
            return bytearray()
        return super().recv(nr_bytes)


class _RequestHandler(RequestHandler):
    """pynetdicom's handler, but the connection's thread stays until its association ends,
    so that the server learns of every end: pynetdicom ends an association without
    EVT_RELEASED or EVT_ABORTED when a malformed PDU stops its protocol machine. PDUs are
    read through :class:`_BoundedSocket` unless scp.max_pdu_size is 0 (unlimited)."""

    server: AcceptorServer

    def handle(self) -> None:
        assoc = self._create_association()
        if self.ae.maximum_pdu_size:
            # The variable field of a P-DATA-TF we receive is at most our maximum (PS3.8 D.1).
            limit = max(self.ae.maximum_pdu_size, PDU_ALLOWANCE)
            _BoundedSocket.bound(cast(AssociationSocket, assoc.dul.socket), limit)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        if self.server.on_association_end is not None:
            self.server.on_association_end(assoc)


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's association server with two defences it lacks against a peer that stops
    talking.

    - Accepted sockets get ``scp.network_timeout_s``: pynetdicom reads a PDU with a blocking
      ``recv`` and checks its own timers only between PDUs, so a peer that stopped in the
      middle of one held its association slot forever.
    - The TLS handshake runs in the connection's own thread under ``scp.acse_timeout_s``:
      pynetdicom does it in the accept loop without a timeout, so one client that connected
      and sent nothing kept every other client out.
    """

    # Connection threads live as long as their association; stopping must not wait for them
    # (StorageSCP.stop gives in-flight associations their grace period itself).
    daemon_threads = True
    on_association_end: Callable[[Association], None] | None = None
    # (peer host, why): a client that failed TLS never reaches pynetdicom's events.
    on_tls_failure: Callable[[str, str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.ae.acse_timeout)
                request.do_handshake()
                request.settimeout(self.ae.network_timeout)
            except (OSError, ValueError) as exc:
                host = client_address[0] if isinstance(client_address, tuple) else client_address
                if isinstance(exc, TimeoutError):
                    why = f"no handshake within scp.acse_timeout_s ({self.ae.acse_timeout:g} s)"
                else:
                    why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                log.warning("TLS handshake with %s failed: %s", host, why)
                if self.on_tls_failure is not None:
                    self.on_tls_failure(str(host), why)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


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
        # Per association: study UID -> [patient ID, instances], reported when it ends.
        self._received: dict[int, dict[str, list]] = {}
        # Established associations whose end has not been handled yet, by the number the
        # log gives them (#1, #2, ... since start) so that its lines about one can be told.
        self._open: dict[int, int] = {}
        self._numbered = 0
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
    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound (host, port)."""
        context = server_ssl_context(self.config.tls) if self.config.tls.enabled else None
        # What AE.start_server(block=False) does, with our server class.
        server = self.ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=self.handlers,
            ssl_context=context,
            server_class=AcceptorServer,
            request_handler=_RequestHandler,
        )
        server.on_association_end = self._on_finished
        server.on_tls_failure = self._on_tls_failure
        self.ae._servers.append(server)  # where pynetdicom's shutdown() removes it from
        threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
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
        """Stop accepting, let in-flight associations finish for up to ``grace_s``, then abort."""
        if self._server is None:
            return
        active = list(self._server.active_associations)
        self._server.shutdown()
        deadline = time.monotonic() + grace_s
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                log.warning("aborting an association still open after %.0f s", grace_s)
                assoc.abort()
        self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def active_associations(self) -> list[Association]:
        return list(self._server.active_associations) if self._server else []

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

    def _on_store(self, event: Event) -> int:
        request = event.request
        context = event.context
        encoded = event.encoded_dataset(include_meta=False)
        try:
            stored = self.store.put(
                encoded,
                context.transfer_syntax,
                _peer(event.assoc),
                expected_sop_class_uid=str(request.AffectedSOPClassUID),
                expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
        except (RejectedInstance, OSError) as exc:
            status = refusal_status(exc)
            # Which instance as a hash of the request's UID (as named on disk), never the UID.
            log.error(
                "C-STORE refused with 0x%04X, nothing stored: %s (instance %s, %s)",
                status,
                exc,
                store_key(str(request.AffectedSOPInstanceUID))[:12],
                self._association(event.assoc),
            )
            self.events.emit(InstanceReceived(stored=False, size=len(encoded)))
            return status
        if stored.result is not StoreResult.STORED:
            log.info(
                "repeated SOP instance %s (%s)",
                store_key(stored.header.sop_instance_uid)[:12],
                stored.result.value,
            )
        log.debug("stored %s at %s", stored.header.sop_instance_uid, stored.path)
        self.assembler.instance_stored(id(event.assoc), stored)
        self.events.emit(InstanceReceived(stored=True, size=len(encoded)))
        with self._received_lock:
            study = self._received.setdefault(id(event.assoc), {}).setdefault(
                stored.header.study_uid, [stored.header.patient_id, 0]
            )
            study[1] += 1
        return STATUS_SUCCESS

    def _on_released(self, event: Event) -> None:
        self._ended(event.assoc, released=True)

    def _on_aborted(self, event: Event) -> None:
        number = self._open.get(id(event.assoc), 0)
        log.warning("association from %s aborted (#%d)", _peer(event.assoc).calling_aet, number)
        self._ended(event.assoc, released=False)

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
        self, assoc: Association, studies: dict[str, list], *, released: bool
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
