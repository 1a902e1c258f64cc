"""pynetdicom's association server, with the defences a listener on a hospital network needs.

What upstream does (pynetdicom 3.0, ``pynetdicom.transport`` and ``pynetdicom.ae``):

- ``AssociationSocket`` reads a PDU into memory whole, at whatever length its header announces
  (up to 4 GiB, PS3.8 9.3.1), whatever the AE's ``maximum_pdu_size``: a peer announcing a huge
  PDU makes the acceptor allocate it.
- ``AssociationServer.get_request`` wraps an accepted socket with ``SSLContext.wrap_socket`` in
  the accept loop, handshake included and without a timeout: one client that connects and sends
  nothing keeps every other client out. Accepted sockets have no timeout either: a PDU is read
  with a blocking ``recv`` and the association's timers are checked only between PDUs, so a
  peer that stops in the middle of one holds its association slot for ever.
- ``RequestHandler.handle`` returns once the association thread is started; an association
  whose protocol machine a malformed PDU stops ends without ``EVT_RELEASED`` or
  ``EVT_ABORTED``, so nothing tells the application it ended.
- ``AE.make_server`` (the hook for custom server classes, pynetdicom issue #452, PR #453) does
  not record the server in ``AE._servers`` as ``start_server`` does, but the server's
  ``shutdown()`` removes itself from that list (``ValueError`` when it is not there).

- pynetdicom has no way to serve an accepted association's P-DATA with another reader. The
  node's fast path (:mod:`dicom_node.receive`) needs one, so the hand-over uses pynetdicom's
  internals: the socket's ``ready`` (the DUL reads only when it says so), the association's
  ``_reactor_checkpoint`` and ``_is_paused`` (the pause its own ``send_c_*`` methods use), the
  DUL's ``_kill_thread`` and the association's ``_kill``. A test per behaviour holds them
  (``tests/test_receive_fast.py``, ``tests/test_association_policy.py``).

- An association's DUL thread is not a daemon, so a connection that never sent its
  A-ASSOCIATE-RQ holds the process's exit for the ACSE timeout.
- ``RequestHandler._create_association`` deep-copies the server's presentation contexts for
  every association: 125 ms on this node's 178 storage contexts of 40 transfer syntaxes
  each, so a sender that opens an association per series (or per instance, as some
  modalities do) could not be served faster than 8 a second. Negotiation only reads them
  (``negotiate_as_acceptor`` builds new result contexts), so :class:`_SharedContexts` makes
  the copy a shallow one.

Upstream issues: none found for any of these (searched pynetdicom's tracker for the PDU length,
the TLS handshake in the accept loop, socket timeouts of accepted connections, associations
ending without an event, and ``make_server``/``shutdown``). Related, about the requestor side:
https://github.com/pydicom/pynetdicom/pull/600 (closed by #618, a socket timeout under TLS) and
https://github.com/pydicom/pynetdicom/pull/565 (a socket timeout on connect, not merged).

Remove when pynetdicom bounds the PDU it reads, handshakes and times out accepted connections
off the accept loop, reports every association's end, and lets ``make_server`` servers shut
down: then :func:`start_acceptor` becomes ``AE.start_server(block=False)`` with the handlers;
the hand-over stays until pynetdicom lets an application take an accepted association's
socket.
Only :mod:`dicom_node.scp` uses this module.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

# The most an A-ASSOCIATE-RQ (or any PDU but P-DATA-TF) needs: 128 presentation contexts with
# every transfer syntax, and user identity items of 64 KiB each (PS3.8 9.3.2, PS3.7 D.3.3.7).
PDU_ALLOWANCE = 1 << 20


class _BoundedSocket(AssociationSocket):
    """An association's socket that does not read a PDU longer than ``limit``: to pynetdicom
    the transport closed. With ``hand_over``, pynetdicom stops reading it once it sent the
    A-ASSOCIATE-AC, so that the connection can be served by another reader."""

    limit: int
    hand_over: bool
    accepted: threading.Event

    @classmethod
    def bound(cls, sock: AssociationSocket, limit: int, *, hand_over: bool) -> _BoundedSocket:
        """Give the socket pynetdicom made the bound. Made anew, it would announce the
        connection to the protocol machine a second time."""
        sock.__class__ = cls
        bounded = cast(_BoundedSocket, sock)
        bounded.limit = limit
        bounded.hand_over = hand_over
        bounded.accepted = threading.Event()
        return bounded

    @property
    def ready(self) -> bool:
        if self.accepted.is_set():
            return False  # handed over: the DUL must not read P-DATA meant for the fast path
        return bool(super().ready)

    def send(self, bytestream: bytes) -> None:
        super().send(bytestream)
        if self.hand_over and bytestream[:1] == b"\x02":  # A-ASSOCIATE-AC (PS3.8 9.3.3)
            self.accepted.set()

    def recv(self, nr_bytes: int) -> bytearray:
        limit = self.limit or nr_bytes
        if nr_bytes > limit:
            log.warning(
                "%s announced a PDU of %d bytes, more than the %d this node reads"
                " (scp.max_pdu_size); connection closed",
                self._assoc.requestor.address,
                nr_bytes,
                self.limit,
            )
            return bytearray()
        return super().recv(nr_bytes)


class _SharedContexts(list[PresentationContext]):
    """The server's supported presentation contexts, which pynetdicom deep-copies for every
    association it creates: a copy of the list that shares the (never modified) contexts."""

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        return list(self)


def _take_from_pynetdicom(assoc: Association, sock: _BoundedSocket) -> socket.socket | None:
    """The connection of an association pynetdicom accepted, once pynetdicom let go of it; None
    when it was not accepted (rejected, aborted, or its peer went away during negotiation).

    pynetdicom's two threads are stopped the way its own ``send_c_*`` methods pause the
    association's reactor (``_reactor_checkpoint``, ``_is_paused``); the association thread
    stays paused and alive until :func:`_give_back` so that ``AE.active_associations``, and
    with it ``scp.max_associations``, still counts the association.
    """
    while not sock.accepted.wait(0.05):
        if not assoc.is_alive():
            return None
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:  # EVT_ESTABLISHED's handlers have run
        if not assoc.is_alive():
            return None
        time.sleep(0.0001)
    if not assoc.is_established:
        assoc._reactor_checkpoint.set()
        return None
    assoc.dul._kill_thread = True
    assoc.dul.join()
    return cast(socket.socket, sock.socket)


def _give_back(assoc: Association, sock: _BoundedSocket) -> None:
    """End pynetdicom's association thread without a word to the peer: the fast path already
    released or aborted it, and the socket server closes the connection."""
    sock.socket = None
    assoc.is_established = False
    assoc._kill = True
    assoc._reactor_checkpoint.set()
    assoc.join()


class _RequestHandler(RequestHandler):
    """pynetdicom's handler, but the connection's thread stays until its association ends, so
    that the server learns of every end. PDUs are read through :class:`_BoundedSocket` unless
    the AE's maximum PDU size is 0 (unlimited). With a server's ``fast_path``, the connection
    is served by it once the association is accepted."""

    server: AcceptorServer

    def handle(self) -> None:
        assoc = self._create_association()
        # pynetdicom's DUL thread is not a daemon: one waiting out the ACSE timeout for a peer
        # that connected and said nothing would hold the process's exit that long.
        assoc.dul.daemon = True
        limit = 0
        if self.ae.maximum_pdu_size:
            # The variable field of a P-DATA-TF we receive is at most our maximum (PS3.8 D.1).
            limit = max(self.ae.maximum_pdu_size, PDU_ALLOWANCE)
        fast_path = self.server.fast_path
        sock = _BoundedSocket.bound(
            cast(AssociationSocket, assoc.dul.socket), limit, hand_over=fast_path is not None
        )
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        if fast_path is not None:
            connection = _take_from_pynetdicom(assoc, sock)
            if connection is not None:
                try:
                    fast_path(assoc, connection, limit)
                finally:
                    _give_back(assoc, sock)
        assoc.join()
        if self.server.on_association_end is not None:
            self.server.on_association_end(assoc)


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's association server with two defences it lacks against a peer that stops
    talking.

    - Accepted sockets get the AE's ``network_timeout`` (``scp.network_timeout_s``).
    - The TLS handshake runs in the connection's own thread under the AE's ``acse_timeout``
      (``scp.acse_timeout_s``), not in the accept loop.
    """

    # Connection threads live as long as their association; stopping must not wait for them
    # (StorageSCP.stop gives in-flight associations their grace period itself).
    daemon_threads = True
    on_association_end: Callable[[Association], None] | None = None
    # Serves an accepted association's connection until it ends: (association, connection,
    # the longest PDU to read or 0); None leaves every association to pynetdicom.
    fast_path: Callable[[Association, socket.socket, int], None] | None = None
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
                if self.on_tls_failure is not None:
                    self.on_tls_failure(str(host), why)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def start_acceptor(
    ae: AE,
    address: tuple[str, int],
    *,
    evt_handlers: list[EventHandlerType],
    ssl_context: ssl.SSLContext | None,
    on_association_end: Callable[[Association], None],
    on_tls_failure: Callable[[str, str], None],
    fast_path: Callable[[Association, socket.socket, int], None] | None = None,
) -> AcceptorServer:
    """What ``AE.start_server(address, block=False, ...)`` does, with :class:`AcceptorServer`:
    listen on ``address`` in a background thread. ``on_association_end`` is called with every
    association once its thread ended, however it ended; ``on_tls_failure`` with (peer host,
    why) for a client whose TLS handshake failed; ``fast_path``, when given, serves each
    accepted association's connection (see :class:`_RequestHandler`). ``server.shutdown()``
    stops it."""
    server = ae.make_server(
        address,
        evt_handlers=evt_handlers,
        ssl_context=ssl_context,
        server_class=AcceptorServer,
        request_handler=_RequestHandler,
    )
    # make_server returns its server_class; pynetdicom types it as that or its default class.
    assert isinstance(server, AcceptorServer)
    server.on_association_end = on_association_end
    server.on_tls_failure = on_tls_failure
    server.fast_path = fast_path
    server.contexts = _SharedContexts(server.contexts)
    ae._servers.append(server)  # where the server's shutdown() removes it from
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    return server
