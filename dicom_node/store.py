"""The durable instance store: Part-10 files on disk, recorded in the SQLite index.

An instance is acknowledged only after :meth:`InstanceStore.put` returned, and ``put`` returns
only after the file and its index row are on disk:

1. the file (preamble, file meta from the negotiated transfer syntax, the data set exactly as
   received, never re-encoded) is written under ``tmp/`` and fsync'd;
2. it is renamed into ``instances/`` (atomic on POSIX) and the folder is fsync'd, so no reader
   ever sees a partial file under ``instances/``;
3. the index row is committed (WAL, ``synchronous=FULL``).

A crash before step 3 leaves at most a complete file without an index row; the sender never got
a Success for it and sends it again, which overwrites the same path. Leftovers under ``tmp/`` are
removed at start-up.

File and folder names are hashes of validated UIDs, never header text, so a SOP Instance UID such
as ``../../etc/x`` is rejected and could not escape the store anyway.

Repeated SOP Instance UID (the documented rule): a copy whose data set is byte-identical to the
stored one is acknowledged and changes nothing; a copy with different content replaces the
stored file and index row (the latest copy wins, as a PACS does on re-send after a correction)
and reopens its series.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import re
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.database import (
    Connection,
    Database,
    SqliteDatabase,
    database_errors,
    database_path,
    open_database,
)
from dicom_node.errors import InvalidInstance, OutOfResources, RejectedInstance, SopMismatch
from dicom_node.header_scan import PIXEL_DATA, as_dataset, is_sequence_tag, plain_text, scan
from dicom_node.priority import RequestPriority

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

log = logging.getLogger(__name__)

# A constant, valid UID under the 2.25 (UUID) root identifying this implementation (PS3.7 D.3.3.2).
IMPLEMENTATION_CLASS_UID = UID(
    "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/dicom-node/dicom-node").int)
)
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 characters.
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PIXEL_DATA = Tag(PIXEL_DATA)


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidInstance` naming ``keyword``."""
    if value is None or str(value).strip("\0 ") == "":
        raise InvalidInstance(f"{keyword} is missing")
    text = str(value).strip("\0 ")
    if len(text) > 64 or not _UID_PATTERN.match(text):
        raise InvalidInstance(f"{keyword} is not a valid UID (PS3.5 9.1)")
    return text


def _uid(ds: Dataset, keyword: str) -> str:
    """An identifying UID of ``ds``, validated, and encoded as one (VR UI).

    A UID sent with another VR is a broken encoder, not a UID: a UL holding "abcd" reads as
    the number 1684234849, a valid UID that would file the instance under a series that
    does not exist.
    """
    if keyword in ds and ds[keyword].VR != "UI":
        raise InvalidInstance(f"{keyword} is encoded as VR {ds[keyword].VR}, not UI")
    return validate_uid(ds.get(keyword), keyword)


def store_key(uid: str) -> str:
    """A short, stable, non-identifying name for a UID: used for paths and in logs above DEBUG."""
    # surrogateescape: a refused request's UID may hold any bytes, and is still logged hashed.
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the index keeps, read from the data set without decoding pixel data."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    patient_id: str | None = None  # for the audit trail only; never logged above DEBUG

    @classmethod
    def from_text(cls, text: dict[int, str]) -> InstanceHeader:
        """From plain text values by tag (:func:`dicom_node.header_scan.plain_text`): the
        same header :meth:`from_dataset` reads from the same values."""
        number = text.get(0x00200011, "")
        return cls(
            sop_class_uid=validate_uid(text.get(0x00080016), "SOPClassUID"),
            sop_instance_uid=validate_uid(text.get(0x00080018), "SOPInstanceUID"),
            study_uid=validate_uid(text.get(0x0020000D), "StudyInstanceUID"),
            series_uid=validate_uid(text.get(0x0020000E), "SeriesInstanceUID"),
            modality=text.get(0x00080060) or None,
            series_number=int(number) if number.strip() else None,
            series_description=text.get(0x0008103E) or None,
            patient_id=text.get(0x00100020) or None,
        )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        number = ds.get("SeriesNumber")
        try:
            series_number = int(number) if number not in (None, "") else None
        except (TypeError, ValueError):
            series_number = None
        return cls(
            sop_class_uid=_uid(ds, "SOPClassUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            modality=str(ds.get("Modality") or "") or None,
            series_number=series_number,
            series_description=str(ds.get("SeriesDescription") or "") or None,
            patient_id=str(ds.get("PatientID") or "") or None,
        )


def _stop_at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag >= _PIXEL_DATA)  # pydicom types a tag comparison as Any


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    vr = ds.get_item(tag).VR
    if vr is None:  # implicit VR, not yet converted: the data dictionary's VR is pydicom's
        return is_sequence_tag(int(tag))
    return bool(vr == "SQ")


def _parse_sequences(ds: Dataset) -> None:
    """Parse every sequence of ``ds``, however deep.

    pydicom parses a sequence of undefined length as it reads the data set, but one of defined
    length (as dcmtk re-encodes them) only when it is first accessed: without this a data set
    nested too deep for pydicom would pass here and fail when its series is read.
    """
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts every element)
        if _is_sequence(ds, tag):
            for item in ds[tag].value:
                _parse_sequences(item)


def _skip_pixel_data(fp: BinaryIO, transfer_syntax: UID) -> None:
    """Move ``fp`` from the start of Pixel Data to the element after it, reading only the
    element's header and, when encapsulated (undefined length), its item headers (PS3.5 A.4).
    """
    endian = "<" if transfer_syntax.is_little_endian else ">"
    start = fp.tell()
    header = fp.read(8)
    if len(header) < 8:
        raise InvalidInstance("data set cannot be parsed (Pixel Data cut short)")
    if Tag(*struct.unpack(f"{endian}HH", header[:4])) != _PIXEL_DATA:
        fp.seek(start)  # no Pixel Data: what follows is parsed as it is
        return
    if transfer_syntax.is_implicit_VR:
        (length,) = struct.unpack(f"{endian}I", header[4:8])
    else:  # OB, OW or UN: 2 reserved bytes, then a 32-bit length (PS3.5 7.1.2)
        (length,) = struct.unpack(f"{endian}I", fp.read(4))
    if length != 0xFFFFFFFF:
        fp.seek(length, os.SEEK_CUR)
        return
    while True:
        item = fp.read(8)
        if len(item) < 8:
            raise InvalidInstance("data set cannot be parsed (Pixel Data has no end)")
        group, element, length = struct.unpack(f"{endian}HHI", item)
        if (group, element) == (0xFFFE, 0xE0DD):  # Sequence Delimitation Item
            return
        fp.seek(length, os.SEEK_CUR)


def _check_vr_encoding(encoded: bytes, transfer_syntax: UID) -> None:
    """Refuse a data set whose first element is not in the negotiated VR encoding.

    pydicom reads such a data set anyway (it guesses from the same two bytes), but the file we
    keep would say one encoding and hold the other, which other readers are not bound to
    guess. Explicit VR puts two upper-case letters after the tag (PS3.5 7.1.2); implicit VR
    puts the low bytes of a length there, letters only for a first value of over 16 kB.
    """
    if len(encoded) < 6:
        return
    explicit = all(0x41 <= b <= 0x5A for b in encoded[4:6])
    if explicit == transfer_syntax.is_implicit_VR:
        found, said = ("explicit", "implicit") if explicit else ("implicit", "explicit")
        raise InvalidInstance(
            f"data set is encoded in {found} VR, but the transfer syntax"
            f" {transfer_syntax.name} is {said} VR"
        )


def read_header(encoded: bytes | memoryview, transfer_syntax: UID) -> InstanceHeader:
    """Parse the identifying attributes of an encoded data set (no file meta).

    The whole data set is parsed as pydicom will parse it when the node reads the instance
    later, every sequence of defined or undefined length included, but Pixel Data is stepped
    over by its (item) lengths: a data set pydicom cannot parse (sequences nested
    too deep for it, an item that does not end) is refused here, as the README promises, not
    acknowledged and then found unreadable when its series is routed. A regular little-endian
    data set is walked by :func:`dicom_node.header_scan.scan` instead, which reads the same
    attributes without building the others; anything irregular is left to pydicom.
    """
    if transfer_syntax.is_little_endian and transfer_syntax != DeflatedExplicitVRLittleEndian:
        _check_vr_encoding(bytes(encoded[:6]), transfer_syntax)
        implicit = transfer_syntax.is_implicit_VR
        scanned = scan(encoded, implicit=implicit)
        if scanned is not None:
            text = plain_text(scanned)
            if text is not None:
                return InstanceHeader.from_text(text)
            return _header_of(as_dataset(scanned, implicit=implicit))
    return _parse_header(BytesIO(encoded), len(encoded), transfer_syntax)


def read_header_at(path: Path, offset: int, transfer_syntax: UID) -> InstanceHeader:
    """:func:`read_header` of the data set that starts at ``offset`` in the file ``path`` and
    runs to its end. Only the pages before Pixel Data, and any after it, are read."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= offset:
            return read_header(b"", transfer_syntax)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)[offset:]
            try:
                return read_header(view, transfer_syntax)
            finally:
                view.release()


def _header_of(ds: Dataset) -> InstanceHeader:
    try:
        return InstanceHeader.from_dataset(ds)
    except RejectedInstance:
        raise
    except Exception as exc:
        raise InvalidInstance(f"data set cannot be parsed ({type(exc).__name__})") from exc


def _parse_header(fp: BinaryIO, end: int, transfer_syntax: UID) -> InstanceHeader:
    """The header of the data set from ``fp``'s position to ``end`` by pydicom; see
    :func:`read_header`."""
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read())
            fp, end = BytesIO(inflated), len(inflated)
        start = fp.tell()
        _check_vr_encoding(fp.read(6), transfer_syntax)
        fp.seek(start)
        implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
        ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixel_data)
        _parse_sequences(ds)
        if fp.tell() < end:  # Pixel Data, and perhaps elements after it
            _skip_pixel_data(fp, transfer_syntax)
            _parse_sequences(read_dataset(fp, implicit, little))
        return InstanceHeader.from_dataset(ds)
    except RejectedInstance:
        raise
    except (Exception, RecursionError) as exc:
        raise InvalidInstance(f"data set cannot be parsed ({type(exc).__name__})") from exc


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-2 element, explicit VR little endian (PS3.5 7.1.2), padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":  # 2 reserved bytes and a 32-bit length
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_aet: str
) -> bytes:
    """Preamble, prefix and File Meta Information of a Part-10 file (PS3.10 7.1).

    Byte for byte what pydicom's ``write_file_meta_info`` writes for the same values (a test
    holds it to that); encoded here because building a pydicom data set for it cost a third of
    the time of storing an instance.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii")),
            _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
            _meta_element(0x0016, b"AE", source_aet.encode("ascii", errors="replace")),
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Make every file under ``folder``, and the folders' entries, durable."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def _dataset_offset(path: Path) -> int:
    """Byte offset where the data set starts in a Part-10 file we wrote."""
    with path.open("rb") as f:
        read_preamble(f, force=False)
        group_length = f.read(12)
        # (0002,0000) UL, explicit VR little endian, as every Part-10 file meta starts (PS3.10 7.1)
        return 128 + 4 + 12 + int.from_bytes(group_length[8:12], "little")


class StoreResult(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical copy already held; nothing changed
    REPLACED = "replaced"  # same SOP Instance UID, different content: the new copy won


@dataclass(frozen=True)
class StoredInstance:
    header: InstanceHeader
    path: Path
    result: StoreResult
    series_reopened: bool
    study_reopened: bool


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: kept in the index for status and audit."""

    calling_aet: str
    peer_host: str


@dataclass(frozen=True)
class _Arrival:
    """An instance renamed into ``instances/`` whose index row is still to be committed."""

    header: InstanceHeader
    transfer_syntax: UID
    relative: Path
    sender: Sender
    received_at: float
    size: int
    request_priority: RequestPriority


class GroupCommit:
    """Index rows of concurrent associations committed in one transaction.

    The first caller to arrive commits every row waiting at that moment and the rows that came
    while it committed wait for the next commit (leader and followers, as PostgreSQL's and
    SQLite's own group commit): one sender pays one commit per instance with no hand-over
    between threads; several senders share each commit's fsync.

    Before the rows are committed the folders their files were renamed into are fsync'd, once
    per folder per batch. That order is kept on purpose: committing a row while its rename
    may still be lost would let a crash leave a row naming a file that is not there, for an
    instance the sender was never told was stored and may never send again; the node would
    then route a series with a hole. The folder fsync costs about a fifth of a millisecond
    here (docs/performance.md), too little to trade that guarantee for a start-up scan.
    """

    def __init__(
        self, commit: Callable[[list[_Arrival]], list[tuple[bool, bool]]], *, fsync: bool
    ) -> None:
        self._commit = commit
        self._fsync = fsync
        self._lock = threading.Condition()
        self._waiting: list[_Pending] = []
        self._committing = False

    def commit(self, arrival: _Arrival, folder: Path) -> tuple[bool, bool]:
        """Return once ``arrival``'s folder is fsync'd and its row committed: whether its
        study and series were reopened. Raises the database's error when the commit failed."""
        pending = _Pending(arrival, folder)
        with self._lock:
            self._waiting.append(pending)
            while not pending.done and self._committing:
                self._lock.wait()
            if pending.done:
                return pending.outcome()
            batch, self._waiting = self._waiting, []
            self._committing = True
        try:
            self._run(batch)
        finally:
            with self._lock:
                self._committing = False
                self._lock.notify_all()
        return pending.outcome()

    def _run(self, batch: list[_Pending]) -> None:
        try:
            if self._fsync:
                for folder in {p.folder for p in batch}:
                    fsync_dir(folder)
            results = self._commit([p.arrival for p in batch])
        except BaseException as exc:  # every waiter learns of it, then the leader raises it
            for p in batch:
                p.error, p.done = exc, True
            return
        for p, result in zip(batch, results, strict=True):
            p.result, p.done = result, True


@dataclass
class _Pending:
    arrival: _Arrival
    folder: Path
    done: bool = False
    result: tuple[bool, bool] = (False, False)
    error: BaseException | None = None

    def outcome(self) -> tuple[bool, bool]:
        if self.error is not None:
            raise self.error
        return self.result


class IncomingInstance:
    """An instance whose data set arrives in fragments: PS3.8 9.3.5 lets a C-STORE's data set
    come in any number of P-DATA-TF PDUs of any number of PDVs. Each fragment goes straight
    to a file under ``tmp/`` behind the file meta, which is encoded from the request's UIDs
    before the data set arrives. Made by :meth:`InstanceStore.incoming`.

    :meth:`finish` parses the header from the file, checks it against the request and makes
    the instance durable and indexed; :meth:`discard` removes what was written (a peer that
    went away mid-instance leaves nothing in ``tmp/``). Not shared between threads.
    """

    def __init__(
        self,
        store: InstanceStore,
        transfer_syntax: UID,
        sender: Sender,
        sop_class_uid: str,
        sop_instance_uid: str,
        request_priority: RequestPriority,
    ) -> None:
        self.store = store
        self.transfer_syntax = transfer_syntax
        self.sender = sender
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.request_priority = request_priority
        # Unique per instance and thread: two associations may carry the same instance at once.
        self.path = store.tmp_dir / f"{store_key(sop_instance_uid)}.{threading.get_ident()}.part"
        meta = encode_file_meta(
            sop_class_uid, sop_instance_uid, transfer_syntax, sender.calling_aet
        )
        self.offset = len(meta)
        self.size = 0
        self._writeback_from = 0  # where the writeback not yet started begins
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(self.fd, meta)
        except BaseException:
            self.discard()
            raise

    def write(self, fragment: bytes | memoryview) -> None:
        """Append the next fragment of the data set."""
        if self.fd is None:
            raise ValueError("the incoming instance was finished or discarded")
        _write_all(self.fd, fragment)
        self.size += len(fragment)
        unsynced = self.offset + self.size - self._writeback_from
        if self.store.fsync and unsynced >= WRITEBACK_STEP:
            # Every few fragments, not each: each call gives up the GIL, which concurrent
            # associations then contend for.
            _start_writeback(self.fd, self._writeback_from, unsynced)
            self._writeback_from += unsynced

    def finish(self, header: InstanceHeader | None = None) -> StoredInstance:
        """Store the instance (see :class:`InstanceStore`); ``header`` when already parsed.
        Raises :class:`RejectedInstance` or ``OSError``; the caller then discards it."""
        if header is None:
            header = read_header_at(self.path, self.offset, self.transfer_syntax)
        stored = self.store._check_stored(self, header)
        self.discard()
        return stored

    def sync(self) -> None:
        """fdatasync the file: its data and size reach the disk."""
        if self.fd is None:
            raise ValueError("the incoming instance was finished or discarded")
        os.fdatasync(self.fd)

    def renamed(self) -> None:
        """The file was moved into ``instances/``: nothing is left to discard."""
        self.path = Path()

    def discard(self) -> None:
        """Close and remove the file under ``tmp/``, if it is still there."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path != Path():
            self.path.unlink(missing_ok=True)
            self.path = Path()


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback, do not wait
WRITEBACK_STEP = 1 << 18


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a fragment back to disk while the rest of the data set arrives
    (Linux sync_file_range(2)), so that the fdatasync before Success waits for less. It
    guarantees nothing by itself: durability is still the fdatasync's."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _same_dataset(stored: Path, incoming: Path, size: int) -> bool:
    """Whether the data set of the stored file and of the incoming one (of ``size`` bytes) are
    byte-identical."""
    try:
        offset = _dataset_offset(stored)
        if stored.stat().st_size - offset != size:
            return False
        with stored.open("rb") as a, incoming.open("rb") as b:
            a.seek(offset)
            b.seek(_dataset_offset(incoming))
            while True:
                left, right = a.read(1 << 20), b.read(1 << 20)
                if left != right:
                    return False
                if not left:
                    return True
    except (OSError, ValueError):
        # Unreadable stored copy: treat as different so the new copy replaces it.
        return False


class InstanceStore:
    """Part-10 files under ``data_dir/instances`` and their rows in the index."""

    def __init__(
        self, data_dir: Path, db: Database, *, min_free_bytes: int = 0, fsync: bool = True
    ) -> None:
        self.data_dir = data_dir
        self.instances_dir = data_dir / "instances"
        self.tmp_dir = data_dir / "tmp"
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._committer = GroupCommit(self._commit_arrivals, fsync=fsync)
        for directory in (self.instances_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    @classmethod
    def open(cls, data_dir: Path, *, min_free_bytes: int = 0, fsync: bool = True) -> InstanceStore:
        data_dir = data_dir.resolve()
        return cls(
            data_dir,
            SqliteDatabase(database_path(data_dir)),
            min_free_bytes=min_free_bytes,
            fsync=fsync,
        )

    @classmethod
    def for_node(cls, config: NodeConfig) -> InstanceStore:
        """The node's store: its data folder, and its database (SQLite there, or the cluster's
        PostgreSQL)."""
        return cls(
            config.store.data_dir.resolve(),
            open_database(config),
            min_free_bytes=config.store.min_free_bytes,
            fsync=config.store.fsync,
        )

    def close(self) -> None:
        self.db.close()

    def _remove_leftovers(self) -> None:
        # Anything under tmp/ was never acknowledged: the sender will send it again.
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning(
                "removed %d unacknowledged partial file(s) left by an interruption", removed
            )

    def relative_path(self, header: InstanceHeader) -> Path:
        study = store_key(header.study_uid)
        return (
            Path("instances")
            / study[:2]
            / study
            / store_key(header.series_uid)
            / f"{store_key(header.sop_instance_uid)}.dcm"
        )

    def _ensure_dir(self, directory: Path) -> None:
        with self._dirs_lock:
            if directory in self._known_dirs:
                return
            created = []
            probe = directory
            while not probe.exists():
                created.append(probe)
                probe = probe.parent
            directory.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                # A new folder is durable only once its parent's entry is.
                for folder in reversed(created):
                    fsync_dir(folder.parent)
            self._known_dirs.add(directory)

    def _check_space(self, incoming: int) -> None:
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(
                f"free disk {free // 2**20} MiB is below the watermark"
                f" store.min_free_bytes={self.min_free_bytes // 2**20} MiB"
            )

    def incoming(
        self,
        transfer_syntax: str,
        sender: Sender,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        request_priority: RequestPriority = "MEDIUM",
    ) -> IncomingInstance:
        """Begin storing an instance whose data set arrives in fragments (the C-STORE request's
        Affected SOP Class and Instance UIDs, PS3.7 9.1.1.1, name it before it arrives).

        The file is written under ``tmp/`` as fragments come; :meth:`IncomingInstance.finish`
        then gives the guarantees of :meth:`put`. Raises :class:`RejectedInstance` when the
        UIDs are not UIDs or the disk is below its watermark, and ``OSError`` when ``tmp/``
        cannot be written.
        """
        sop_class_uid = validate_uid(sop_class_uid, "AffectedSOPClassUID")
        sop_instance_uid = validate_uid(sop_instance_uid, "AffectedSOPInstanceUID")
        self._check_space(0)
        return IncomingInstance(
            self, UID(transfer_syntax), sender, sop_class_uid, sop_instance_uid, request_priority
        )

    def _check_stored(self, incoming: IncomingInstance, header: InstanceHeader) -> StoredInstance:
        """Make an incoming instance durable and indexed: its file fsync'd, renamed into
        ``instances/``, the folder fsync'd, then its row committed (group commit)."""
        if header.sop_class_uid != incoming.sop_class_uid:
            raise SopMismatch("SOPClassUID differs from the C-STORE request's Affected SOP Class")
        if header.sop_instance_uid != incoming.sop_instance_uid:
            raise SopMismatch(
                "SOPInstanceUID differs from the C-STORE request's Affected SOP Instance"
            )
        self._check_space(incoming.size)
        relative = self.relative_path(header)
        final = self.data_dir / relative
        try:
            with self.db.reading_beside() as conn:
                existing = conn.execute(
                    "SELECT path FROM instances WHERE sop_instance_uid = ?",
                    (header.sop_instance_uid,),
                ).fetchone()
        except database_errors() as exc:
            raise _index_unavailable(exc) from exc
        if existing is not None:
            stored_path = self.data_dir / existing["path"]
            if _same_dataset(stored_path, incoming.path, incoming.size):
                # finish() discards the incoming copy.
                return StoredInstance(header, stored_path, StoreResult.DUPLICATE, False, False)
        if self.fsync:
            incoming.sync()  # data and size; the rename is made durable below
        self._ensure_dir(final.parent)
        os.replace(incoming.path, final)
        incoming.renamed()
        arrival = _Arrival(
            header,
            incoming.transfer_syntax,
            relative,
            incoming.sender,
            time.time(),
            incoming.size,
            incoming.request_priority,
        )
        try:
            study_reopened, series_reopened = self._committer.commit(arrival, final.parent)
        except database_errors() as exc:
            # No Success without the index commit: the file goes too (unless an earlier copy's
            # row still points at it), and the sender is told to try again later.
            if existing is None or existing["path"] != relative.as_posix():
                final.unlink(missing_ok=True)
            raise _index_unavailable(exc) from exc
        result = StoreResult.STORED
        if existing is not None:
            result = StoreResult.REPLACED
            if existing["path"] != relative.as_posix():
                # The replacing copy moved to another series: the old file has no row any more.
                (self.data_dir / existing["path"]).unlink(missing_ok=True)
        return StoredInstance(header, final, result, series_reopened, study_reopened)

    def put(
        self,
        dataset: bytes,
        transfer_syntax: str,
        sender: Sender,
        *,
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        request_priority: RequestPriority = "MEDIUM",
    ) -> StoredInstance:
        """Store one encoded data set durably; see the module docstring for the guarantees.
        ``request_priority`` is the C-STORE request's Priority (PS3.7 9.1.1.1), which is not
        in the data set: kept in the index for routing rules.

        Raises a :class:`RejectedInstance` subclass, leaving nothing behind, when the instance
        cannot be stored.
        """
        header = read_header(dataset, UID(transfer_syntax))
        incoming = self.incoming(
            transfer_syntax,
            sender,
            expected_sop_class_uid or header.sop_class_uid,
            expected_sop_instance_uid or header.sop_instance_uid,
            request_priority=request_priority,
        )
        try:
            incoming.write(dataset)
            return incoming.finish(header)
        finally:
            incoming.discard()

    def _commit_arrivals(self, arrivals: list[_Arrival]) -> list[tuple[bool, bool]]:
        """Record arrivals in one transaction; for each, whether its study and series were
        reopened."""
        with self.db.transaction() as conn:
            return [self._index(conn, arrival) for arrival in arrivals]

    def _index(self, conn: Connection, arrival: _Arrival) -> tuple[bool, bool]:
        """Record the instance, its series and study; whether the study and the series were
        reopened."""
        header = arrival.header
        study_reopened = _record_arrival(
            conn,
            "studies",
            "study_uid",
            {"study_uid": header.study_uid, "study_key": store_key(header.study_uid)},
            arrival.received_at,
        )
        series_reopened = _record_arrival(
            conn,
            "series",
            "series_uid",
            {
                "series_uid": header.series_uid,
                "series_key": store_key(header.series_uid),
                "study_uid": header.study_uid,
                "modality": header.modality,
                "series_number": header.series_number,
                "description": header.series_description,
            },
            arrival.received_at,
        )
        conn.execute(
            f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})"
            " ON CONFLICT (sop_instance_uid) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in _INSTANCE_COLUMNS[1:]),
            (
                header.sop_instance_uid,
                header.series_uid,
                header.study_uid,
                header.sop_class_uid,
                str(arrival.transfer_syntax),
                arrival.relative.as_posix(),
                arrival.size,
                arrival.sender.calling_aet,
                arrival.sender.peer_host,
                arrival.received_at,
                arrival.request_priority,
            ),
        )
        return study_reopened, series_reopened


def _index_unavailable(exc: Exception) -> OutOfResources:
    """The database failed (gone, locked, full): a failure status the sender retries. Only the
    error's type is named: a database's message may quote the UIDs it was given."""
    return OutOfResources(f"the index database failed ({type(exc).__name__}); nothing stored")


_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "series_uid",
    "study_uid",
    "sop_class_uid",
    "transfer_syntax",
    "path",
    "size",
    "calling_aet",
    "peer_host",
    "received_at",
    "request_priority",
)


def _record_arrival(
    conn: Connection, table: str, key: str, columns: dict[str, object], now: float
) -> bool:
    """Insert a study/series row on its first instance, else refresh it and reopen it.

    Returns True when the arrival reopens a study/series that was complete.
    """
    uid = columns[key]
    row = conn.execute(f"SELECT completed_at FROM {table} WHERE {key} = ?", (uid,)).fetchone()
    if row is None:
        values = {**columns, "first_received": now, "last_received": now}
        conn.execute(
            f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
            tuple(values.values()),
        )
        return False
    conn.execute(
        f"UPDATE {table} SET last_received = ?, completed_at = NULL WHERE {key} = ?", (now, uid)
    )
    return row["completed_at"] is not None
