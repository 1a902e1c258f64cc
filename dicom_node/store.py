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

import hashlib
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR
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
_PIXEL_DATA = Tag(0x7FE0, 0x0010)


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
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False  # an unknown private tag is read as UN, never as items
    return vr == "SQ"


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


def _skip_pixel_data(fp: BytesIO, transfer_syntax: UID) -> None:
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


def read_header(encoded: bytes, transfer_syntax: UID) -> InstanceHeader:
    """Parse the identifying attributes of an encoded data set (no file meta).

    The whole data set is parsed as pydicom will parse it when the node reads the instance
    later, every sequence of defined or undefined length included, but Pixel Data is stepped
    over by its (item) lengths: a data set pydicom cannot parse (sequences nested
    too deep for it, an item that does not end) is refused here, as the README promises, not
    acknowledged and then found unreadable when its series is routed.
    """
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            encoded = zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded)
        _check_vr_encoding(encoded, transfer_syntax)
        fp = BytesIO(encoded)
        implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
        ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixel_data)
        _parse_sequences(ds)
        if fp.tell() < len(encoded):  # Pixel Data, and perhaps elements after it
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

    def _write_file(self, final: Path, file_meta: bytes, dataset: bytes) -> None:
        # Unique per instance and thread: two associations may carry the same instance at once.
        tmp_name = self.tmp_dir / f"{final.stem}.{threading.get_ident()}.part"
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(file_meta)
                f.write(dataset)
                f.flush()
                if self.fsync:
                    os.fdatasync(f.fileno())  # data and size; the rename is made durable below
            self._ensure_dir(final.parent)
            os.replace(tmp_name, final)
            if self.fsync:
                fsync_dir(final.parent)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _same_content(self, stored: Path, dataset: bytes) -> bool:
        try:
            offset = _dataset_offset(stored)
            if stored.stat().st_size - offset != len(dataset):
                return False
            with stored.open("rb") as f:
                f.seek(offset)
                return f.read() == dataset
        except (OSError, ValueError):
            # Unreadable stored copy: treat as different so the new copy replaces it.
            return False

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
        ts = UID(transfer_syntax)
        header = read_header(dataset, ts)
        if expected_sop_class_uid and header.sop_class_uid != expected_sop_class_uid:
            raise SopMismatch("SOPClassUID differs from the C-STORE request's Affected SOP Class")
        if expected_sop_instance_uid and header.sop_instance_uid != expected_sop_instance_uid:
            raise SopMismatch(
                "SOPInstanceUID differs from the C-STORE request's Affected SOP Instance"
            )
        self._check_space(len(dataset))

        relative = self.relative_path(header)
        final = self.data_dir / relative
        try:
            with self.db.reading() as conn:
                existing = conn.execute(
                    "SELECT path FROM instances WHERE sop_instance_uid = ?",
                    (header.sop_instance_uid,),
                ).fetchone()
        except database_errors() as exc:
            raise _index_unavailable(exc) from exc
        if existing is not None:
            stored_path = self.data_dir / existing["path"]
            if self._same_content(stored_path, dataset):
                return StoredInstance(header, stored_path, StoreResult.DUPLICATE, False, False)

        self._write_file(
            final,
            encode_file_meta(header.sop_class_uid, header.sop_instance_uid, ts, sender.calling_aet),
            dataset,
        )
        now = time.time()
        try:
            study_reopened, series_reopened = self._index(
                header, ts, relative, sender, now, len(dataset), request_priority
            )
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

    def _index(
        self,
        header: InstanceHeader,
        ts: UID,
        relative: Path,
        sender: Sender,
        now: float,
        size: int,
        request_priority: RequestPriority,
    ) -> tuple[bool, bool]:
        """Record the instance, its series and study in one transaction; whether the study and
        the series were reopened."""
        with self.db.transaction() as conn:
            study_reopened = _record_arrival(
                conn,
                "studies",
                "study_uid",
                {"study_uid": header.study_uid, "study_key": store_key(header.study_uid)},
                now,
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
                now,
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
                    str(ts),
                    relative.as_posix(),
                    size,
                    sender.calling_aet,
                    sender.peer_host,
                    now,
                    request_priority,
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
