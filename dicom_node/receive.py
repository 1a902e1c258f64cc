"""The receive stage's fast path: P-DATA read straight from an association pynetdicom accepted.

pynetdicom negotiates every association (the allow-list, rejections, user identity, extended
negotiation, TLS); once the A-ASSOCIATE-AC is sent, :mod:`dicom_node.compat.pynetdicom_server`
hands the connection to :class:`FastAssociation`, which serves C-STORE and C-ECHO itself:

- PDUs (PS3.8 9.3.1) are read with ``recv_into`` into one buffer, and each PDV fragment of a
  data set (PS3.8 9.3.5, E.2) goes from that buffer to the instance's file under ``tmp/``: no
  PDU, message or data set is assembled in memory. pynetdicom's own receive path copies every
  PDU three or four times and hands each message between two threads that poll in 1 ms steps.
- Command sets (PS3.7 6.3.1, E.1: implicit VR little endian, group 0000) are decoded and the
  responses encoded here, for the handful of elements C-STORE and C-ECHO carry (PS3.7 9.3.1,
  9.3.5); a test holds both to pynetdicom's DIMSE messages.
- Requests are answered one at a time: the node negotiates the Asynchronous Operations Window
  down to 1 (PS3.7 D.3.3.3), and a response is sent only after the instance is durable.
- Any other DIMSE request is answered with status 0x0211 Unrecognized Operation (PS3.7 C.4.2);
  a PDU or PDV that breaks PS3.8 ends the association with an A-ABORT.
- Timeouts are the listener's: a peer silent for ``network_timeout`` between PDUs, or inside
  one, is aborted, as pynetdicom's idle timer does.

The service behind it (storing, counting, auditing) is :class:`Service`, which
:class:`dicom_node.scp.StorageSCP` implements over the same store as pynetdicom's path.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from dicom_node.errors import PeerGone, ProtocolError

log = logging.getLogger(__name__)

# PDU types, PS3.8 9.3.1.
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# A-ABORT source and reason (PS3.8 Table 9-26).
SOURCE_SERVICE_USER = 0x00
SOURCE_SERVICE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PDU_PARAMETER = 0x06

# Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101  # Command Data Set Type (PS3.7 E.1)

STATUS_UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.4.2

# Command elements (group 0000), PS3.7 E.1.
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000
MOVE_ORIGINATOR_AET = 0x1030

# A command set is a few hundred bytes; more than this is not a command set.
MAX_COMMAND = 1 << 16
# Read-ahead: a whole PDU of the node's default size, and a few small PDUs, per recv_into.
BUFFER = 1 << 18

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


class Ending(Enum):
    RELEASED = "released"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Context:
    """An accepted presentation context (PS3.8 9.3.3.2)."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class Command:
    """The elements of a DIMSE request command set the node acts on (PS3.7 E.1)."""

    field: int
    message_id: int
    has_data_set: bool
    affected_sop_class: str
    affected_sop_instance: str
    priority: int  # 0 MEDIUM, 1 HIGH, 2 LOW (PS3.7 9.1.1.1)
    move_originator: str

    @classmethod
    def decode(cls, encoded: bytes) -> Command:
        """Decode a command set; :class:`ProtocolError` when it is not one."""
        elements = decode_command(encoded)

        def number(element: int, default: int | None = None) -> int:
            value = elements.get(element)
            if value is None or len(value) != 2:
                if default is not None and value is None:
                    return default
                raise ProtocolError(f"command element (0000,{element:04X}) is not a US")
            return int.from_bytes(value, "little")

        def text(element: int) -> str:
            return elements.get(element, b"").decode("ascii", "replace").strip("\0 ")

        return cls(
            field=number(COMMAND_FIELD),
            message_id=number(MESSAGE_ID, default=0),
            has_data_set=number(DATA_SET_TYPE) != NO_DATA_SET,
            affected_sop_class=text(AFFECTED_SOP_CLASS),
            affected_sop_instance=text(AFFECTED_SOP_INSTANCE),
            priority=number(PRIORITY, default=0),
            move_originator=text(MOVE_ORIGINATOR_AET),
        )


def decode_command(encoded: bytes) -> dict[int, bytes]:
    """Elements of a command set by element number (implicit VR little endian, PS3.7 6.3.1)."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(encoded):
        if offset + 8 > len(encoded):
            raise ProtocolError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(encoded, offset)
        offset += 8
        if group != 0x0000:
            raise ProtocolError(f"command set holds group {group:04X} (PS3.7 6.3.1)")
        if offset + length > len(encoded):
            raise ProtocolError("command element runs past the command set")
        elements[element] = encoded[offset : offset + length]
        offset += length
    return elements


def encode_command(elements: Iterable[tuple[int, str | int]]) -> bytes:
    """A command set of group 0000 elements, with its group length (PS3.7 E.1): ``int`` values
    as US, ``str`` values as UI (padded with NUL) or AE/LO (padded with a space)."""
    body = bytearray()
    for element, value in sorted(elements):
        if isinstance(value, int):
            encoded = value.to_bytes(2, "little")
        else:
            encoded = value.encode("ascii")
            if len(encoded) % 2:
                uid = element in (AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE)
                encoded += b"\0" if uid else b" "
        body += _ELEMENT.pack(0x0000, element, len(encoded)) + encoded
    return _ELEMENT.pack(0x0000, 0x0000, 4) + len(body).to_bytes(4, "little") + bytes(body)


def encode_response(command: Command, status: int) -> bytes:
    """The response to ``command`` (C-STORE-RSP PS3.7 9.3.1.2, C-ECHO-RSP 9.3.5.2, or any
    other request's response with its Command Field's response bit set)."""
    elements: list[tuple[int, str | int]] = [
        (COMMAND_FIELD, command.field | RESPONSE_BIT),
        (MESSAGE_ID_RESPONDED_TO, command.message_id),
        (DATA_SET_TYPE, NO_DATA_SET),
        (STATUS, status),
    ]
    if command.affected_sop_class:
        elements.append((AFFECTED_SOP_CLASS, command.affected_sop_class))
    if command.affected_sop_instance:
        elements.append((AFFECTED_SOP_INSTANCE, command.affected_sop_instance))
    return encode_command(elements)


def p_data_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """``command`` as P-DATA-TF PDUs of one PDV each, each PDU's variable field at most
    ``max_pdu`` (the peer's Maximum Length, PS3.8 D.1; 0 is unlimited)."""
    step = len(command) if max_pdu == 0 else max(1, max_pdu - 6)
    out = bytearray()
    for start in range(0, max(1, len(command)), step):
        fragment = command[start : start + step]
        last = start + step >= len(command)
        header = 0x01 | (0x02 if last else 0x00)  # command; last fragment (PS3.8 E.2)
        out += _PDU_HEADER.pack(P_DATA_TF, len(fragment) + 6)
        out += _PDV_HEADER.pack(len(fragment) + 2, context_id, header) + fragment
    return bytes(out)


def a_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8)."""
    return _PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


A_RELEASE_RP_PDU = _PDU_HEADER.pack(A_RELEASE_RP, 4) + bytes(4)


class Sink(Protocol):
    """Where a C-STORE's data set goes, fragment by fragment."""

    def write(self, fragment: memoryview) -> None: ...

    def close(self) -> int:
        """The data set is complete: store it; the C-STORE status to answer."""
        ...

    def discard(self) -> None:
        """The association ended before the data set did: keep nothing."""
        ...


class Service(Protocol):
    """What the fast path serves requests with (one per association)."""

    def store(self, context: Context, command: Command) -> Sink:
        """A sink for the data set of a C-STORE request; never raises (a sink that refuses
        answers the refusal's status at :meth:`Sink.close`)."""
        ...

    def echo(self) -> int:
        """The C-ECHO status."""
        ...


class _Reader:
    """Bytes from a socket through one read-ahead buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buffer):
            # Move the unread tail to the front (it is at most a header's few bytes here).
            tail = self.end - self.start
            self.buffer[:tail] = self.buffer[self.start : self.end]
            self.start, self.end = 0, tail
        try:
            received = self.sock.recv_into(self.view[self.end :])
        except TimeoutError as exc:
            raise PeerGone("network timeout", timed_out=True) from exc
        except OSError as exc:
            raise PeerGone(f"connection failed ({type(exc).__name__})") from exc
        if received == 0:
            raise PeerGone("connection closed by the peer")
        self.end += received

    def exact(self, n: int) -> memoryview:
        """The next ``n`` bytes (``n`` at most a few dozen: headers)."""
        while self.end - self.start < n:
            self._fill()
        chunk = self.view[self.start : self.start + n]
        self.start += n
        return chunk

    def chunks(self, n: int) -> Iterable[memoryview]:
        """The next ``n`` bytes, in the pieces the socket delivers them."""
        while n > 0:
            if self.start == self.end:
                self._fill()
            take = min(n, self.end - self.start)
            chunk = self.view[self.start : self.start + take]
            self.start += take
            n -= take
            yield chunk


class FastAssociation:
    """Serve one accepted association's P-DATA until it is released or aborted."""

    def __init__(
        self,
        sock: socket.socket,
        contexts: Iterable[Context],
        service: Service,
        *,
        peer_max_pdu: int,
        max_pdu: int,
        network_timeout_s: float,
        name: str,
    ) -> None:
        self.sock = sock
        self.contexts = {c.id: c for c in contexts}
        self.service = service
        self.peer_max_pdu = peer_max_pdu
        self.max_pdu = max_pdu  # the longest PDU read; 0 reads any (each is streamed)
        self.name = name  # the association in the log
        self.sock.settimeout(network_timeout_s)
        self._reader = _Reader(sock)
        self._send_lock = threading.Lock()
        self._closed = False
        # The message in progress (PS3.8 E.2: fragments of one command, then of its data set).
        self._command = bytearray()
        self._context: Context | None = None
        self._request: Command | None = None
        self._sink: Sink | None = None

    def run(self) -> Ending:
        """Serve requests until the association ends; how it ended."""
        try:
            while True:
                kind, length = _PDU_HEADER.unpack(self._reader.exact(6))
                if self.max_pdu and length > self.max_pdu:
                    log.warning(
                        "%s announced a PDU of %d bytes, more than the %d this node reads"
                        " (scp.max_pdu_size); connection closed",
                        self.name,
                        length,
                        self.max_pdu,
                    )
                    return Ending.ABORTED
                if kind == P_DATA_TF:
                    self._p_data(length)
                elif kind == A_RELEASE_RQ:
                    self._skip(length)
                    self._send(A_RELEASE_RP_PDU)
                    if self._sink is not None or self._command:
                        log.warning("%s released in the middle of a message", self.name)
                    return Ending.RELEASED
                elif kind == A_ABORT:
                    return Ending.ABORTED
                elif A_ASSOCIATE_RQ <= kind <= A_RELEASE_RP:
                    raise ProtocolError(f"unexpected PDU type {kind:#04x}", REASON_UNEXPECTED_PDU)
                else:
                    raise ProtocolError(f"unknown PDU type {kind:#04x}", REASON_UNRECOGNIZED_PDU)
        except ProtocolError as exc:
            log.warning("%s: %s (PS3.8); association aborted", self.name, exc)
            self._send(a_abort(SOURCE_SERVICE_PROVIDER, exc.reason))
            return Ending.ABORTED
        except PeerGone as exc:
            if exc.timed_out:
                log.warning("%s: network timeout (scp.network_timeout_s); aborted", self.name)
                self._send(a_abort(SOURCE_SERVICE_USER, REASON_NOT_SPECIFIED))
            return Ending.ABORTED
        finally:
            if self._sink is not None:
                self._sink.discard()
                self._sink = None

    def abort(self) -> None:
        """End the association from another thread (the node stops): an A-ABORT, then the
        connection is shut down, which ends :meth:`run`."""
        self._send(a_abort(SOURCE_SERVICE_USER, REASON_NOT_SPECIFIED))
        with contextlib.suppress(OSError):  # already closed
            self.sock.shutdown(socket.SHUT_RDWR)

    def _skip(self, length: int) -> None:
        for _ in self._reader.chunks(length):
            pass

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            if self._closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self._closed = True  # the peer is gone; the reader finds out next

    def _p_data(self, length: int) -> None:
        """One P-DATA-TF: its PDV items (PS3.8 9.3.5), each fragment where it belongs."""
        while length > 0:
            if length < 6:
                raise ProtocolError("P-DATA-TF ends inside a PDV item header")
            item_length, context_id, header = _PDV_HEADER.unpack(self._reader.exact(6))
            if item_length < 2 or item_length - 2 > length - 6:
                raise ProtocolError("PDV item length does not fit its P-DATA-TF")
            length -= 4 + item_length
            context = self.contexts.get(context_id)
            if context is None:
                raise ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            is_command, last = bool(header & 0x01), bool(header & 0x02)
            if header & 0xFC:
                raise ProtocolError("PDV message control header has reserved bits set")
            data = self._reader.chunks(item_length - 2)
            if is_command:
                self._command_fragment(context, data, last)
            else:
                self._data_fragment(context, data, last)

    def _command_fragment(self, context: Context, data: Iterable[memoryview], last: bool) -> None:
        if self._request is not None:
            raise ProtocolError("a command fragment arrived inside a data set")
        if self._command and self._context is not context:
            raise ProtocolError("a command's fragments changed presentation context")
        self._context = context
        for chunk in data:
            self._command += chunk
        if len(self._command) > MAX_COMMAND:
            raise ProtocolError(f"a command set of more than {MAX_COMMAND} bytes")
        if not last:
            return
        command = Command.decode(bytes(self._command))
        self._command.clear()
        if command.field & RESPONSE_BIT:
            raise ProtocolError("a DIMSE response sent to the acceptor", REASON_UNEXPECTED_PDU)
        if command.has_data_set:
            self._request = command
            if command.field == C_STORE_RQ:
                self._sink = self.service.store(context, command)
            return
        if command.field == C_ECHO_RQ:
            self._respond(context, command, self.service.echo())
        else:
            self._respond(context, command, STATUS_UNRECOGNIZED_OPERATION)

    def _data_fragment(self, context: Context, data: Iterable[memoryview], last: bool) -> None:
        request = self._request
        if request is None:
            raise ProtocolError("a data set fragment arrived without its command")
        if context is not self._context:
            raise ProtocolError("a data set arrived on another context than its command")
        sink = self._sink
        for chunk in data:
            if sink is not None:
                sink.write(chunk)
        if not last:
            return
        self._request = None
        if sink is None:  # a request this fast path does not serve; its data set is dropped
            self._respond(context, request, STATUS_UNRECOGNIZED_OPERATION)
            return
        self._sink = None
        self._respond(context, request, sink.close())

    def _respond(self, context: Context, command: Command, status: int) -> None:
        self._send(p_data_pdus(context.id, encode_response(command, status), self.peer_max_pdu))
