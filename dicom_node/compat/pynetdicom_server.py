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

Upstream issues: none found for any of these (searched pynetdicom's tracker for the PDU length,
the TLS handshake in the accept loop, socket timeouts of accepted connections, associations
ending without an event, and ``make_server``/``shutdown``). Related, about the requestor side:
https://github.com/pydicom/pynetdicom/pull/600 (closed by #618, a socket timeout under TLS) and
https://github.com/pydicom/pynetdicom/pull/565 (a socket timeout on connect, not merged).

Remove when pynetdicom bounds the PDU it reads, handshakes and times out accepted connections
off the accept loop, reports every association's end, and lets ``make_server`` servers shut
down: then :func:`start_acceptor` becomes ``AE.start_server(block=False)`` with the handlers.
Only :mod:`dicom_node.scp` uses this module.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

# The most an A-ASSOCIATE-RQ (or any PDU but P-DATA-TF) needs: 128 presentation contexts with
# every transfer syntax, and user identity items of 64 KiB each (PS3.8 9.3.2, PS3.7 D.3.3.7).
PDU_ALLOWANCE = 1 << 20


class _BoundedSocket(AssociationSocket):
    """An association's socket that does not read a PDU longer than ``limit``: to pynetdicom
    the transport closed."""

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
    """pynetdicom's handler, but the connection's thread stays until its association ends, so
    that the server learns of every end. PDUs are read through :class:`_BoundedSocket` unless
    the AE's maximum PDU size is 0 (unlimited)."""

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

    - Accepted sockets get the AE's ``network_timeout`` (``scp.network_timeout_s``).
    - The TLS handshake runs in the connection's own thread under the AE's ``acse_timeout``
      (``scp.acse_timeout_s``), not in the accept loop.
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
) -> AcceptorServer:
    """What ``AE.start_server(address, block=False, ...)`` does, with :class:`AcceptorServer`:
    listen on ``address`` in a background thread. ``on_association_end`` is called with every
    association once its thread ended, however it ended; ``on_tls_failure`` with (peer host,
    why) for a client whose TLS handshake failed. ``server.shutdown()`` stops it."""
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
    ae._servers.append(server)  # where the server's shutdown() removes it from
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    return server
