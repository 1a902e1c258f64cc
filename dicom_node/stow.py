"""STOW-RS: instances stored over HTTP (PS3.18 10.5 Store Transaction) with the guarantees of
C-STORE.

A request is ``POST /dicom-web/studies`` or ``POST /dicom-web/studies/{study}`` with a
``multipart/related; type="application/dicom"`` body (PS3.18 8.6.1.2), each part a PS3.10 file.
Each part is streamed to the store as it is read (its data set never held in memory whole) and
goes through :meth:`InstanceStore.incoming`, so an instance listed as stored in the response's
ReferencedSOPSequence was fsync'd, renamed and indexed first, exactly as a C-STORE Success
means. What could not be stored is listed in FailedSOPSequence with the failure reason C-STORE
would have answered (PS3.4 B.2.3), plus 0x0122 for a SOP class and 0xC122 for a transfer syntax
the node does not accept (the Store Instances failure reasons of PS3.18 10.5.3), and 0xA900
for an instance of another study than the one ``/studies/{study}`` names.

A request is one unit for completion, like one association: its instances are reported to the
assembler under one key, which ends (released) when the response is sent, or ends aborted when
the body breaks off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from http import HTTPStatus
from typing import Any

from dicom_node.assembly import Assembler
from dicom_node.errors import (
    InvalidInstance,
    IrregularDataSet,
    RejectedInstance,
    SopMismatch,
    StowRequestError,
)
from dicom_node.events import Events, InstanceReceived, StudiesReceived, StudyRef
from dicom_node.header_scan import explicit_element
from dicom_node.scp import (
    STATUS_CANNOT_UNDERSTAND,
    accepted_transfer_syntaxes,
    refusal_status,
    storage_sop_classes,
)
from dicom_node.store import (
    IncomingInstance,
    InstanceStore,
    Sender,
    StoredInstance,
    StoreResult,
    read_header_at,
    store_key,
)

log = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-2 (Store Instances Response Failure Reasons) adds these to C-STORE's.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

# A file meta group longer than this is not one a modality writes: the part is refused
# rather than buffered without bound.
MAX_FILE_META = 64 * 1024
READ_SIZE = 256 * 1024
# RFC 2046 5.1.1 allows 70 characters; Orthanc's DICOMweb client sends 73: read liberally.
MAX_BOUNDARY = 256

ReadFn = Callable[[int], bytes]


# -- the HTTP body -----------------------------------------------------------------------------


def length_reader(read: ReadFn, length: int) -> ReadFn:
    """The body of a request with a Content-Length (RFC 9112 6.2): ``length`` bytes, then
    end of data; a body that ends early is a broken request."""
    left = length

    def read_body(size: int) -> bytes:
        nonlocal left
        if left <= 0:
            return b""
        data = read(min(size, left))
        if not data:
            raise StowRequestError(HTTPStatus.BAD_REQUEST, "the request body ended early")
        left -= len(data)
        return data

    return read_body


def chunked_reader(read: ReadFn, readline: Callable[[int], bytes]) -> ReadFn:
    """The body of a request sent with ``Transfer-Encoding: chunked`` (RFC 9112 7.1), which
    Orthanc's DICOMweb client uses for STOW-RS by default."""
    left = 0
    done = False

    def read_body(size: int) -> bytes:
        nonlocal left, done
        if done:
            return b""
        if left == 0:
            line = readline(1024)
            try:
                left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise StowRequestError(HTTPStatus.BAD_REQUEST, "a malformed chunk size") from None
            if left == 0:
                while readline(1024) not in (b"\r\n", b"\n", b""):  # trailer fields
                    pass
                done = True
                return b""
        data = read(min(size, left))
        if not data:
            raise StowRequestError(HTTPStatus.BAD_REQUEST, "the request body ended early")
        left -= len(data)
        if left == 0:
            readline(3)  # the CRLF after the chunk
        return data

    return read_body


# -- multipart/related (RFC 2387, RFC 2046 5.1) ----------------------------------------------


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """A media type and its parameters (lower-case names; quotes removed)."""
    message = Message()
    message["Content-Type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


class Part:
    """One body part: its header fields, and its content read in pieces by :meth:`read`."""

    def __init__(self, reader: MultipartReader, headers: Message) -> None:
        self._reader = reader
        self.headers = headers
        self.finished = False

    def read(self) -> bytes:
        """The next piece of the content; ``b""`` at its end."""
        if self.finished:
            return b""
        data, self.finished = self._reader._content_piece()
        return data

    def drain(self) -> None:
        while not self.finished:
            self.read()


class MultipartReader:
    """Body parts of a multipart body read from a stream, each part's content in pieces, so
    that a request of any size is read in constant memory."""

    def __init__(self, read: ReadFn, boundary: str) -> None:
        self._read = read
        # The first delimiter may open the body without the CRLF that precedes later ones.
        self._buffer = b"\r\n"
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._read(READ_SIZE)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    def _find(self, what: bytes, start: int = 0) -> int:
        while True:
            at = self._buffer.find(what, start)
            if at >= 0:
                return at
            start = max(0, len(self._buffer) - len(what) + 1)
            if not self._fill():
                return -1

    def parts(self) -> Iterator[Part]:
        """Each part in turn; a part not read to its end is skipped when the next is asked."""
        at = self._find(self._delimiter)
        if at < 0:
            raise StowRequestError(HTTPStatus.BAD_REQUEST, "no multipart boundary in the body")
        self._buffer = self._buffer[at + len(self._delimiter) :]
        while True:
            while len(self._buffer) < 2 and self._fill():
                pass
            if self._buffer.startswith(b"--"):  # the close delimiter; what follows is epilogue
                return
            end = self._find(b"\r\n")
            if end < 0:
                raise StowRequestError(HTTPStatus.BAD_REQUEST, "the multipart body ended early")
            self._buffer = self._buffer[end + 2 :]  # transport padding and CRLF
            while len(self._buffer) < 2 and self._fill():
                pass
            if self._buffer.startswith(b"\r\n"):  # a part without header fields
                header_bytes, self._buffer = b"", self._buffer[2:]
            else:
                end = self._find(b"\r\n\r\n")
                if end < 0:
                    raise StowRequestError(
                        HTTPStatus.BAD_REQUEST, "a body part's header fields do not end"
                    )
                header_bytes, self._buffer = self._buffer[: end + 2], self._buffer[end + 4 :]
            part = Part(self, BytesHeaderParser().parsebytes(header_bytes))
            yield part
            part.drain()

    def _content_piece(self) -> tuple[bytes, bool]:
        """The next piece of the current part's content, and whether it was the last."""
        at = self._buffer.find(self._delimiter)
        while at < 0:
            keep = len(self._delimiter) - 1
            if len(self._buffer) > READ_SIZE:
                # What cannot be the start of a delimiter is content.
                piece, self._buffer = self._buffer[:-keep], self._buffer[-keep:]
                return piece, False
            searched = max(0, len(self._buffer) - keep)
            if not self._fill():
                raise StowRequestError(HTTPStatus.BAD_REQUEST, "the multipart body ended early")
            at = self._buffer.find(self._delimiter, searched)
        piece, self._buffer = self._buffer[:at], self._buffer[at + len(self._delimiter) :]
        return piece, True


# -- PS3.10 files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileMeta:
    """What the File Meta Information (PS3.10 7.1) of a part says, and where its data set
    starts."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    dataset_offset: int


def _text(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii", errors="replace")


def parse_file_meta(prefix: bytes) -> FileMeta | None:
    """The file meta of a PS3.10 file from its first bytes; None when more bytes are needed.

    Group 0002 is always explicit VR little endian (PS3.10 7.1); its elements are walked up to
    the first element of another group, so a file without (0002,0000) is read as well.
    Raises :class:`InvalidInstance` when the bytes are not a PS3.10 file.
    """
    if len(prefix) < 132:
        return None
    if prefix[128:132] != b"DICM":
        raise InvalidInstance("not a PS3.10 file: no 'DICM' prefix after the 128-byte preamble")
    values: dict[int, bytes] = {}
    at = 132
    while True:
        if len(prefix) < at + 8:
            return None if len(prefix) < MAX_FILE_META else _too_long()
        if prefix[at : at + 2] != b"\x02\x00":  # the first element of the data set
            break
        try:
            tag, length, start = explicit_element(prefix, at)
        except IrregularDataSet:
            if len(prefix) < at + 12:
                return None  # a header with a 32-bit length, not all here yet
            raise InvalidInstance("the file meta is not explicit VR little endian") from None
        element = tag & 0xFFFF
        if start + length > MAX_FILE_META:
            return _too_long()
        if len(prefix) < start + length:
            return None
        values[element] = prefix[start : start + length]
        at = start + length
    missing = [name for name, e in _META_UIDS.items() if not values.get(e, b"").strip(b"\0 ")]
    if missing:
        raise InvalidInstance(f"the file meta lacks {', '.join(missing)}")
    return FileMeta(
        transfer_syntax=_text(values[0x0010]),
        sop_class_uid=_text(values[0x0002]),
        sop_instance_uid=_text(values[0x0003]),
        dataset_offset=at,
    )


_META_UIDS = {
    "MediaStorageSOPClassUID": 0x0002,
    "MediaStorageSOPInstanceUID": 0x0003,
    "TransferSyntaxUID": 0x0010,
}


def _too_long() -> FileMeta:
    raise InvalidInstance(f"the file meta is longer than {MAX_FILE_META // 1024} KiB")


# -- the store transaction ---------------------------------------------------------------------


@dataclass
class Outcome:
    """What one part came to: stored (or a repeat), or failed with a reason."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    why: str = ""


@dataclass
class StowResponse:
    """The response to a store transaction (PS3.18 10.5.3): status and DICOM JSON body."""

    status: HTTPStatus
    body: dict[str, Any]
    outcomes: list[Outcome]

    @property
    def stored(self) -> int:
        return sum(o.failure is None for o in self.outcomes)

    @property
    def failed(self) -> int:
        return len(self.outcomes) - self.stored


class StowService:
    """Stores STOW-RS requests through the same store, assembler and events as the SCP."""

    def __init__(
        self,
        store: InstanceStore,
        assembler: Assembler,
        events: Events,
        called_aet: str,
        *,
        complete_on_request_end: bool = True,
    ) -> None:
        self.store = store
        self.complete_on_request_end = complete_on_request_end
        self.assembler = assembler
        self.events = events
        self.called_aet = called_aet
        self._sop_classes = frozenset(storage_sop_classes())
        self._transfer_syntaxes = frozenset(accepted_transfer_syntaxes())

    def store_request(
        self,
        read: ReadFn,
        content_type: str,
        sender: Sender,
        *,
        study_uid: str | None,
        base_url: str,
    ) -> StowResponse:
        """Read a request body and store its instances; raises :class:`StowRequestError`
        (400 or 415) when the request as a whole cannot be read, with what was stored before
        the fault already accounted for."""
        media_type, params = parse_content_type(content_type)
        if media_type != "multipart/related":
            raise StowRequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                'send multipart/related; type="application/dicom" (PS3.18 10.5.1.1)',
            )
        # A type may carry parameters of its own (a transfer-syntax) inside its quotes.
        part_type = params.get("type", "application/dicom").split(";")[0].strip().lower()
        if part_type != "application/dicom":
            raise StowRequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"parts of type {part_type!r} are not accepted: only application/dicom"
                " (PS3.10 files); metadata with bulk data is not supported",
            )
        boundary = params.get("boundary", "")
        if not 1 <= len(boundary) <= MAX_BOUNDARY:
            raise StowRequestError(
                HTTPStatus.BAD_REQUEST, f"no usable multipart boundary in {content_type!r}"
            )
        reader = MultipartReader(read, boundary)
        unit = object()  # the assembler's key for this request, held until it ends
        self.assembler.association_opened(id(unit))
        outcomes: list[Outcome] = []
        completed = False
        try:
            for part in reader.parts():
                outcomes.append(self._store_part(part, sender, study_uid, id(unit)))
            completed = True
        finally:
            # Ended as released, the request completes what only it carried; ended as aborted
            # (broken off, or completion left to the quiet time by configuration), nothing.
            self.assembler.association_ended(
                id(unit), released=completed and self.complete_on_request_end
            )
            self._report(outcomes, sender, released=completed)
        return _response(outcomes, base_url)

    def _store_part(self, part: Part, sender: Sender, study_uid: str | None, unit: int) -> Outcome:
        declared = part.headers.get_content_type() if part.headers.get("Content-Type") else None
        if declared not in (None, "application/dicom"):
            return Outcome("", "", failure=STATUS_CANNOT_UNDERSTAND, why=f"a {declared} part")
        prefix = b""
        meta = None
        try:
            while meta is None:
                data = part.read()
                if not data:
                    raise InvalidInstance("the part ends inside its file meta")
                prefix += data
                meta = parse_file_meta(prefix)
        except InvalidInstance as exc:
            return self._failed(Outcome("", ""), exc)
        outcome = Outcome(meta.sop_class_uid, meta.sop_instance_uid)
        if meta.sop_class_uid not in self._sop_classes:
            outcome.failure, outcome.why = STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted"
            return self._logged(outcome, 0)
        if meta.transfer_syntax not in self._transfer_syntaxes:
            outcome.failure = STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED
            outcome.why = "transfer syntax not accepted"
            return self._logged(outcome, 0)
        try:
            incoming = self.store.incoming(
                meta.transfer_syntax, sender, meta.sop_class_uid, meta.sop_instance_uid
            )
        except (RejectedInstance, OSError) as exc:
            return self._failed(outcome, exc)
        try:
            incoming.write(prefix[meta.dataset_offset :])
            while data := part.read():
                incoming.write(data)
            stored = self._finish(incoming, study_uid)
        except (RejectedInstance, OSError) as exc:
            return self._failed(outcome, exc, incoming.size)
        finally:
            incoming.discard()
        self.assembler.instance_stored(unit, stored)
        outcome.study_uid = stored.header.study_uid
        outcome.series_uid = stored.header.series_uid
        if stored.result is not StoreResult.STORED:
            log.info(
                "repeated SOP instance %s (%s)",
                store_key(stored.header.sop_instance_uid)[:12],
                stored.result.value,
            )
        self.events.emit(InstanceReceived(stored=True, size=incoming.size))
        return outcome

    def _finish(self, incoming: IncomingInstance, study_uid: str | None) -> StoredInstance:
        header = read_header_at(incoming.path, incoming.offset, incoming.transfer_syntax)
        if study_uid is not None and header.study_uid != study_uid:
            # PS3.18 10.5.1: the target study of /studies/{study} binds every instance.
            raise SopMismatch("StudyInstanceUID differs from the study the request targets")
        return incoming.finish(header)

    def _failed(self, outcome: Outcome, exc: Exception, size: int = 0) -> Outcome:
        outcome.failure = refusal_status(exc)
        outcome.why = str(exc)
        return self._logged(outcome, size)

    def _logged(self, outcome: Outcome, size: int) -> Outcome:
        log.error(
            "STOW-RS instance refused with 0x%04X, nothing stored: %s (instance %s)",
            outcome.failure,
            outcome.why,
            store_key(outcome.sop_instance_uid)[:12] if outcome.sop_instance_uid else "unnamed",
        )
        self.events.emit(InstanceReceived(stored=False, size=size))
        return outcome

    def _report(self, outcomes: list[Outcome], sender: Sender, *, released: bool) -> None:
        """One audit record per request, as one per association (PS3.15 A.5.3.2)."""
        counts: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.failure is None and outcome.study_uid is not None:
                counts[outcome.study_uid] = counts.get(outcome.study_uid, 0) + 1
        if not counts:
            return
        self.events.emit(
            StudiesReceived(
                sender.calling_aet,
                sender.peer_host,
                self.called_aet,
                tuple(StudyRef(uid, None, n) for uid, n in counts.items()),
                released,
            )
        )


def _response(outcomes: list[Outcome], base_url: str) -> StowResponse:
    """PS3.18 10.5.3: 200 when every instance was stored, 202 when some were, 409 when none;
    the body lists both (Table 10.5.3-3)."""
    if not outcomes:
        raise StowRequestError(HTTPStatus.BAD_REQUEST, "the request holds no body part")
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict[str, Any] = {}
    studies = {o.study_uid for o in stored}
    if len(studies) == 1:
        (only,) = studies
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{only}"]}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    **_uids(o),
                    "00081197": {"vr": "US", "Value": [o.failure]},
                }
                for o in failed
            ],
        }
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {**_uids(o), "00081190": {"vr": "UR", "Value": [_instance_url(base_url, o)]}}
                for o in stored
            ],
        }
    status = HTTPStatus.OK if not failed else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT
    return StowResponse(status, body, outcomes)


def _instance_url(base_url: str, o: Outcome) -> str:
    """The instance's WADO-RS URL (PS3.18 10.4.1.1.3)."""
    return f"{base_url}/studies/{o.study_uid}/series/{o.series_uid}/instances/{o.sop_instance_uid}"


def _uids(outcome: Outcome) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    return item
