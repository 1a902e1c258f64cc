"""DICOMweb origin server, read side: QIDO-RS search (PS3.18 10.6) and WADO-RS retrieve
(PS3.18 10.4) of what the node holds, so that a viewer (OHIF) or a PACS can pull the node's
results beside the images they were made from.

What is served is the index: the ``instances`` table (what the node received) and the
``outputs`` table (its own SEG, SR and SC), both pointing at files under the data folder. A
file that retention removed is not there: it is neither listed nor counted, never a 500.
Attributes the index does not hold (patient, study and series descriptions, instance numbers)
come from the header of a stored instance, read once per file version (:func:`header`).

=============================================================  =========================
``/dicom-web/studies``  ``/series``  ``/instances``            QIDO-RS, all of a level
``/dicom-web/studies/{study}/series``  ``.../instances``       QIDO-RS within a study
``/dicom-web/studies/{study}/series/{series}/instances``       QIDO-RS within a series
``/dicom-web/studies/{study}[/series/{series}[/instances/{sop}]]``    WADO-RS instances
``.../metadata`` at those three levels                          WADO-RS metadata (JSON)
``.../instances/{sop}/frames/{1,2,...}``                        WADO-RS frames
``.../instances/{sop}/bulkdata/{tag}[/{item}/{tag}...]``        WADO-RS bulk data
=============================================================  =========================

Every answer is an :class:`Answer`; errors are answered, not raised: 400 for a malformed
request (a UID that is not one, an unknown query key), 404 for what the node does not hold,
406 for an Accept that cannot be satisfied (with the reason).
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.config import NodeConfig
from dicom_node.database import Connection, open_reader
from dicom_node.store import store_key

log = logging.getLogger(__name__)

PREFIX = "/dicom-web"
_VALID_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

DICOM_JSON = "application/dicom+json"
PART10 = "application/dicom"
OCTETS = "application/octet-stream"
# The transfer syntax a Part 10 or frame response has when the Accept names none (PS3.18
# 8.7.3.5.2, 8.7.4: Explicit VR Little Endian for application/dicom and application/octet-stream).
DEFAULT_SYNTAX = ExplicitVRLittleEndian
# Native (uncompressed) encodings a stored instance can be re-encoded to with pydicom alone.
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# PS3.18 Table 8.7.4-1 (and 10.4.1-2): the media type of a compressed frame, by transfer syntax.
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# Older names clients still send (dicomweb-client JS: image/x-jls, image/x-dicom-rle).
_MEDIA_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}

# Values longer than this of binary VRs go out as BulkDataURI (PS3.18 F.2.7), not inline.
BULK_THRESHOLD = 1024
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_PIXEL_DATA = 0x7FE00010
CHUNK = 1 << 20  # a stored file is streamed in pieces this size

# What a search returns at each level (PS3.18 Tables 10.6.3-3 to -5), besides the
# computed attributes (counts, RetrieveURL, ModalitiesInStudy) and the query's own keys.
STUDY_ATTRIBUTES = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
SERIES_ATTRIBUTES = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
_CONTROL_KEYS = {"limit", "offset", "fuzzymatching", "includefield"}
MAX_LIMIT = 10_000


# -- answers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A response: status, media type, and a body given whole or as pieces to stream."""

    status: int
    content_type: str
    body: bytes | Iterable[bytes]


def _error(status: HTTPStatus, reason: str) -> Answer:
    return Answer(status, "application/json", json.dumps({"error": reason}).encode())


def _json_answer(data: Any) -> Answer:
    return Answer(HTTPStatus.OK, f"{DICOM_JSON}; charset=utf-8", json.dumps(data).encode())


@dataclass(frozen=True)
class Unacceptable:
    """Why the Accept header cannot be satisfied (a 406's reason, PS3.18 8.7.5)."""

    reason: str


def _not_acceptable(refusal: Unacceptable) -> Answer:
    return _error(HTTPStatus.NOT_ACCEPTABLE, refusal.reason)


def _undecodable(entry: Entry, exc: Exception, failure: str, pronoun: str) -> Answer:
    """A 406 for pixel data pydicom could not decode or re-encode: the stored syntax is still
    offered, and the reason says how to ask for it."""
    log.warning("WADO-RS: %s (instance %s): %s", failure, store_key(entry.sop), exc)
    return _not_acceptable(
        Unacceptable(
            f"{failure} ({type(exc).__name__}); transfer-syntax=* gives {pronoun} as stored"
        )
    )


def answer(config: NodeConfig, path: str, query: str, accept: str | None, base: str) -> Answer:
    """Answer ``GET path?query`` (``path`` unquoted, under ``/dicom-web``) with the Accept
    header ``accept``; ``base`` is /dicom-web as the client addresses it (its Host header, so
    that a RetrieveURL or BulkDataURI resolves on the page's own origin behind a proxy)."""
    try:
        params = parse_qs(query, keep_blank_values=True)
        return _route(_Origin(config, base), path, params, accept)
    except LookupError as exc:  # raised with the reason as its only argument
        return _error(HTTPStatus.NOT_FOUND, str(exc.args[0]) if exc.args else "not found")
    except ValueError as exc:
        return _error(HTTPStatus.BAD_REQUEST, str(exc))


def _route(server: _Origin, path: str, params: dict[str, list[str]], accept: str | None) -> Answer:
    rest = path[len(PREFIX) :].strip("/")
    parts = rest.split("/") if rest else []
    if not parts:
        raise LookupError(f"nothing at {path}")
    # Searches over all of a level: /studies, /series, /instances.
    if len(parts) == 1 and parts[0] in ("studies", "series", "instances"):
        return server.search(parts[0], {}, params)
    if parts[0] != "studies" or len(parts) < 2:
        raise LookupError(f"nothing at {path}")
    scope: dict[str, str] = {}
    levels = ("study", "series", "sop")
    names = ("studies", "series", "instances")
    i = 0
    level = 0
    while i < len(parts) and level < 3 and parts[i] == names[level]:
        if i + 1 == len(parts):
            # /studies/{s}/series or /studies/{s}/series/{r}/instances: a search in scope.
            if level == 0:
                break
            return server.search(names[level], scope, params)
        scope[levels[level]] = _checked_uid(parts[i + 1])
        i += 2
        level += 1
    tail = parts[i:]
    if not tail:
        return server.retrieve(scope, accept)
    if tail == ["metadata"]:
        return server.metadata(scope, accept)
    if level == 1 and tail == ["instances"]:
        return server.search("instances", scope, params)
    if level == 3 and len(tail) == 2 and tail[0] == "frames":
        return server.frames(scope, _frame_list(tail[1]), accept)
    if level == 3 and len(tail) >= 2 and tail[0] == "bulkdata":
        return server.bulkdata(scope, tail[1:], accept)
    if tail[0] in ("rendered", "thumbnail"):
        return _not_acceptable(Unacceptable("rendered resources are not offered"))
    raise LookupError(f"nothing at {path}")


def _checked_uid(text: str) -> str:
    if len(text) > 64 or not _VALID_UID.fullmatch(text):  # PS3.5 9.1
        raise ValueError(f"not a UID: {text[:80]!r}")
    return text


def _frame_list(text: str) -> list[int]:
    try:
        frames = [int(f) for f in text.split(",")]
    except ValueError:
        raise ValueError(f"frame list {text[:80]!r}: comma-separated numbers from 1") from None
    if not frames or min(frames) < 1:
        raise ValueError(f"frame list {text[:80]!r}: comma-separated numbers from 1")
    return frames


# -- the catalogue: what the node holds, from the index ------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One stored instance, received or written by the node."""

    sop: str
    series: str
    study: str
    sop_class: str
    path: Path
    received: bool  # from the instances table (else the node's own result)


def catalogue(conn: Connection, data_dir: Path, scope: Mapping[str, str]) -> list[Entry]:
    """The instances in ``scope`` (keys study, series, sop) whose files are still there, in the
    order they arrived, results after what they were made from."""
    columns = {"study": "study_uid", "series": "series_uid", "sop": "sop_instance_uid"}
    keys = [key for key in columns if key in scope]

    def where(alias: str) -> str:
        tests = [f"{alias}.{columns[key]} = ?" for key in keys]
        return (" WHERE " + " AND ".join(tests)) if tests else ""

    args = [scope[key] for key in keys]
    rows = conn.execute(
        "SELECT i.sop_instance_uid, i.series_uid, i.study_uid, i.sop_class_uid, i.path,"
        f" 1 AS received, i.received_at AS t FROM instances i{where('i')}"
        " UNION ALL"
        " SELECT o.sop_instance_uid, o.series_uid, o.study_uid, o.sop_class_uid, o.path,"
        # Results in the order their jobs were made (ids grow), without reading the jobs
        # table, which only the job store reads (tests/test_job_store.py).
        f" 0 AS received, o.job_id AS t FROM outputs o"
        f"{where('o')}"
        " ORDER BY received DESC, t, sop_instance_uid",
        (*args, *args),
    ).fetchall()
    found = []
    seen: set[str] = set()
    for row in rows:
        path = data_dir / row[4]
        # Retention may have removed the file: not served, not counted. A result the node was
        # sent back (a PACS forwarding everything) is one instance, served as received.
        if row[0] not in seen and path.is_file():
            seen.add(row[0])
            found.append(Entry(row[0], row[1], row[2], row[3], path, bool(row[5])))
    return found


# -- headers, cached by file version ------------------------------------------------------------

_HEADERS: OrderedDict[tuple[str, int, int], Dataset] = OrderedDict()
_HEADERS_LOCK = threading.Lock()
HEADER_CACHE = 2048  # headers kept (a CT slice's is a few kB)


def header(path: Path) -> Dataset:
    """The data set of ``path`` up to its pixel data (file meta included), read once per file
    version (path, size, mtime) and shared: callers must not change it."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _HEADERS_LOCK:
        cached = _HEADERS.get(key)
        if cached is not None:
            _HEADERS.move_to_end(key)
            return cached
    ds = dcmread(path, stop_before_pixels=True)
    with _HEADERS_LOCK:
        _HEADERS[key] = ds
        while len(_HEADERS) > HEADER_CACHE:
            _HEADERS.popitem(last=False)
    return ds


def stored_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return (
        UID(str(meta.TransferSyntaxUID))
        if meta is not None and "TransferSyntaxUID" in meta
        else ImplicitVRLittleEndian
    )


# -- QIDO-RS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A query key (PS3.18 8.3.4.1): an attribute by keyword or tag, and the value to match."""

    tag: int
    keyword: str
    vr: str
    value: str

    @classmethod
    def parse(cls, name: str, value: str) -> Key:
        if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
            tag = int(name, 16)
        else:
            found = tag_for_keyword(name)
            if found is None:
                raise ValueError(f"query key {name[:64]!r} is neither a keyword nor a tag")
            tag = found
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise ValueError(f"query key {name[:64]!r}: no such attribute") from None
        if vr == "SQ":
            raise ValueError(f"query key {name[:64]!r}: sequence matching is not supported")
        return cls(tag, keyword_for_tag(tag), vr, value)

    def matches(self, values: Sequence[str]) -> bool:
        """PS3.4 C.2.2.2: universal (empty), UID list, range (DA, TM, DT), wild card, single
        value; several values (comma or backslash) match when any does."""
        query = self.value
        if query == "":
            return True
        if self.vr in ("DA", "TM", "DT") and "-" in query:
            low, _, high = query.partition("-")
            low, high = _time_text(low), _time_text(high)
            return any(
                (not low or _time_text(v) >= low)
                and (not high or _time_text(v)[: len(high)] <= high)
                for v in values
            )
        wanted = re.split(r"[\\,]", query) if self.vr in ("UI", "CS") else [query]
        fold = self.vr == "PN"
        for want in wanted:
            want = want.strip()
            for have in values:
                have = have.strip()
                if fold:
                    want, have = want.lower(), have.lower()
                if "*" in want or "?" in want:
                    if fnmatch.fnmatchcase(have, want.replace("[", "[[]")):
                        return True
                elif have == want:
                    return True
        return False


def _time_text(text: str) -> str:
    return text.replace(":", "").replace(".", "").strip()


@dataclass(frozen=True)
class Query:
    """A QIDO-RS request's parameters (PS3.18 8.3.4)."""

    keys: tuple[Key, ...]
    limit: int | None
    offset: int
    include: tuple[int, ...]
    include_all: bool

    @classmethod
    def parse(cls, params: Mapping[str, list[str]]) -> Query:
        keys: list[Key] = []
        include: list[int] = []
        include_all = False
        for name, values in params.items():
            if name in _CONTROL_KEYS:
                continue
            keys.extend(Key.parse(name, v) for v in values)
        for value in params.get("includefield", []):
            for field_name in value.split(","):
                field_name = field_name.strip()
                if field_name == "all":
                    include_all = True
                elif re.fullmatch(r"[0-9A-Fa-f]{8}", field_name):
                    include.append(int(field_name, 16))
                elif (tag := tag_for_keyword(field_name)) is not None:
                    include.append(tag)
                # else: an attribute we do not know cannot be returned; ignored (PS3.18 8.3.4.3)
        return cls(
            tuple(keys),
            _count(params, "limit", None),
            _count(params, "offset", 0) or 0,
            tuple(include),
            include_all,
        )


def _count(params: Mapping[str, list[str]], name: str, default: int | None) -> int | None:
    values = params.get(name)
    if not values or values[-1] == "":
        return default
    try:
        number = int(values[-1])
    except ValueError:
        raise ValueError(f"{name} must be a whole number") from None
    if not 0 <= number <= (MAX_LIMIT if name == "limit" else 1 << 31):
        raise ValueError(f"{name} out of range")
    return number


@dataclass
class _Group:
    """A study or a series: its instances, and the header that speaks for it."""

    uid: str
    entries: list[Entry]

    @property
    def representative(self) -> Entry:
        return self.entries[0]  # received before results: the source's own header


def _grouped(entries: Iterable[Entry], key: Callable[[Entry], str]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for entry in entries:
        groups.setdefault(key(entry), _Group(key(entry), [])).entries.append(entry)
    return list(groups.values())


def _element(tag: int, values: Sequence[Any] | Any) -> DataElement:
    return DataElement(tag, dictionary_VR(tag), values)


class _Origin:
    """One request's view of the node."""

    def __init__(self, config: NodeConfig, base: str) -> None:
        self.config = config
        self.data_dir = config.store.data_dir.resolve()
        self.base = base

    def entries(self, scope: Mapping[str, str]) -> list[Entry]:
        with open_reader(self.config) as conn:
            return catalogue(conn, self.data_dir, scope)

    def _found(self, scope: Mapping[str, str]) -> list[Entry]:
        entries = self.entries(scope)
        if not entries:
            what = "instance" if "sop" in scope else "series" if "series" in scope else "study"
            raise LookupError(f"no such {what} on this node")
        return entries

    def url(self, entry: Entry, level: str) -> str:
        url = f"{self.base}/studies/{entry.study}"
        if level in ("series", "instances"):
            url += f"/series/{entry.series}"
        if level == "instances":
            url += f"/instances/{entry.sop}"
        return url

    # -- search --------------------------------------------------------------------------------

    def search(
        self, level: str, scope: Mapping[str, str], params: Mapping[str, list[str]]
    ) -> Answer:
        query = Query.parse(params)
        entries = self.entries(scope)
        if scope and not entries:
            raise LookupError("no such study or series on this node")
        # Keys the index answers narrow the entries before any header is read.
        for key in query.keys:
            if key.keyword in (
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
                "SOPClassUID",
            ):
                attr = {
                    "StudyInstanceUID": "study",
                    "SeriesInstanceUID": "series",
                    "SOPInstanceUID": "sop",
                    "SOPClassUID": "sop_class",
                }[key.keyword]
                entries = [e for e in entries if key.matches([getattr(e, attr)])]
        if level == "studies":
            groups = _grouped(entries, lambda e: e.study)
            results = [self._study(g, query) for g in groups]
        elif level == "series":
            groups = _grouped(entries, lambda e: e.series)
            results = [self._series(g, query, with_study=not scope) for g in groups]
        else:
            results = [self._instance(e, query, scope) for e in entries]
        matched = [ds for ds in results if ds is not None]
        end = None if query.limit is None else query.offset + query.limit
        page = matched[query.offset : end]
        # PS3.18 8.3.4.4.1 with CP-2473: no match is 200 with an empty array, which
        # dicomweb-client (Python and JavaScript) and OHIF take as "nothing found".
        return _json_answer([_to_json(ds, None) for ds in page])

    def _copy(self, out: Dataset, source: Dataset, keywords: Iterable[str]) -> None:
        for keyword in keywords:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            if tag in source:
                out[tag] = source[tag]
            else:
                out[tag] = _element(tag, None)

    def _extras(self, out: Dataset, source: Dataset, query: Query) -> bool:
        """Add the query's keys and included fields from ``source``; whether the keys match."""
        if query.include_all:
            for element in source:
                if element.tag != _PIXEL_DATA and element.tag not in out:
                    out[element.tag] = element
        for tag in query.include:
            if tag in source and tag not in out:
                out[tag] = source[tag]
        for key in query.keys:
            if key.tag not in out:
                out[key.tag] = source[key.tag] if key.tag in source else _element(key.tag, None)
            if not key.matches(_values(out[key.tag])):
                return False
        return True

    def _study(self, group: _Group, query: Query) -> Dataset | None:
        source = header(group.representative.path)
        out = Dataset()
        self._copy(out, source, STUDY_ATTRIBUTES)
        series = _grouped(group.entries, lambda e: e.series)
        modalities = sorted(
            {str(header(s.representative.path).get("Modality", "")) for s in series} - {""}
        )
        out.ModalitiesInStudy = modalities
        out.NumberOfStudyRelatedSeries = len(series)
        out.NumberOfStudyRelatedInstances = len(group.entries)
        out.RetrieveURL = self.url(group.representative, "studies")
        out.InstanceAvailability = "ONLINE"
        # At study level, Modality asks which studies hold a series of that modality.
        keys = tuple(
            Key(0x00080061, "ModalitiesInStudy", "CS", k.value) if k.keyword == "Modality" else k
            for k in query.keys
        )
        return out if self._extras(out, source, _replace_keys(query, keys)) else None

    def _series(self, group: _Group, query: Query, *, with_study: bool) -> Dataset | None:
        source = header(group.representative.path)
        out = Dataset()
        if with_study:  # PS3.18 10.6.3.3.2: a search of all series returns study attributes
            self._copy(out, source, STUDY_ATTRIBUTES)
        self._copy(out, source, SERIES_ATTRIBUTES)
        out.StudyInstanceUID = group.representative.study
        out.NumberOfSeriesRelatedInstances = len(group.entries)
        out.RetrieveURL = self.url(group.representative, "series")
        out.InstanceAvailability = "ONLINE"
        return out if self._extras(out, source, query) else None

    def _instance(self, entry: Entry, query: Query, scope: Mapping[str, str]) -> Dataset | None:
        source = header(entry.path)
        out = Dataset()
        if "study" not in scope:
            self._copy(out, source, STUDY_ATTRIBUTES)
        if "series" not in scope:
            self._copy(out, source, SERIES_ATTRIBUTES)
        self._copy(out, source, INSTANCE_ATTRIBUTES)
        out.StudyInstanceUID = entry.study
        out.SeriesInstanceUID = entry.series
        out.SOPInstanceUID = entry.sop
        out.SOPClassUID = entry.sop_class
        out.RetrieveURL = self.url(entry, "instances")
        out.InstanceAvailability = "ONLINE"
        return out if self._extras(out, source, query) else None

    # -- retrieve ------------------------------------------------------------------------------

    def retrieve(self, scope: Mapping[str, str], accept: str | None) -> Answer:
        """PS3.18 10.4.1.1.1 (instances): multipart/related; type="application/dicom"."""
        entries = self._found(scope)
        wanted = _part10_syntaxes(accept, single="sop" in scope)
        if isinstance(wanted, Unacceptable):
            return _not_acceptable(wanted)
        plans = []
        for entry in entries:
            ds = header(entry.path)
            syntax = choose_syntax(stored_syntax(ds), wanted.syntaxes, has_pixels(ds))
            if isinstance(syntax, Unacceptable):
                return _not_acceptable(syntax)
            plans.append((entry, syntax))
        if len(plans) == 1:
            # One instance is re-encoded before the status is sent, so that a file pydicom
            # cannot decode is a 406 with the reason, not a body cut short.
            entry, syntax = plans[0]
            try:
                body = b"".join(_part10(entry.path, syntax))
            except Exception as exc:  # pydicom's decoders raise what their libraries raise
                return _undecodable(
                    entry, exc, f"the instance could not be converted to {syntax}", "it"
                )
            if wanted.single:
                return Answer(HTTPStatus.OK, PART10, body)
            parts: Iterable[tuple[str, Iterable[bytes]]] = [
                (PART10 + f"; transfer-syntax={syntax}", [body])
            ]
        else:
            parts = ((PART10 + f"; transfer-syntax={s}", _part10(e.path, s)) for e, s in plans)
        boundary = _boundary()
        return Answer(
            HTTPStatus.OK,
            f'multipart/related; type="{PART10}"; boundary={boundary}',
            _multipart(boundary, parts),
        )

    def metadata(self, scope: Mapping[str, str], accept: str | None) -> Answer:
        """PS3.18 10.4.1.1.2: the data sets as DICOM JSON, bulk data by BulkDataURI."""
        refused = _json_accepted(accept)
        if refused is not None:
            return _not_acceptable(refused)
        entries = self._found(scope)
        out = []
        for entry in entries:
            ds = header(entry.path)
            instance_url = self.url(entry, "instances")
            data = _to_json(ds, instance_url)
            if has_pixels(ds):
                data[f"{_PIXEL_DATA:08X}"] = {
                    "vr": _pixel_vr(ds),
                    "BulkDataURI": f"{instance_url}/bulkdata/{_PIXEL_DATA:08X}",
                }
            # Available Transfer Syntax UID: the syntax the frames are stored in, what a client
            # asking transfer-syntax=* gets (cornerstone's WADO-RS loader reads it).
            data["00083002"] = {"vr": "UI", "Value": [str(stored_syntax(ds))]}
            out.append(dict(sorted(data.items())))
        return _json_answer(out)

    def frames(self, scope: Mapping[str, str], numbers: list[int], accept: str | None) -> Answer:
        """PS3.18 10.4.1.1.3: the frames, each its own part: application/octet-stream for
        native pixel data, the compressed bit stream with its image media type otherwise."""
        (entry,) = self._found(scope)
        ds = header(entry.path)
        if not has_pixels(ds):
            raise LookupError("the instance has no pixel data")
        count = int(ds.get("NumberOfFrames") or 1)
        beyond = [n for n in numbers if n > count]
        if beyond:
            raise LookupError(f"frame {beyond[0]} beyond the {count} frames")
        return self._pixel_parts(entry, ds, numbers, accept)

    def _pixel_parts(
        self, entry: Entry, ds: Dataset, numbers: list[int], accept: str | None
    ) -> Answer:
        stored = stored_syntax(ds)
        choice = frame_choice(accept, stored, decodable(stored))
        if isinstance(choice, Unacceptable):
            return _not_acceptable(choice)
        if choice.single and len(numbers) != 1:
            return _not_acceptable(
                Unacceptable(f"{choice.media_type} holds one frame: ask multipart/related")
            )
        try:
            frames = _frames(entry.path, numbers, keep_encoded=choice.encoded)
        except Exception as exc:  # pydicom's decoders raise what their libraries raise
            return _undecodable(entry, exc, "the frames could not be decoded", "them")
        if choice.encoded:
            media = f"{FRAME_MEDIA_TYPES.get(str(stored), OCTETS)}; transfer-syntax={stored}"
        else:
            media = f"{OCTETS}; transfer-syntax={DEFAULT_SYNTAX}"
        if choice.single:
            return Answer(HTTPStatus.OK, media, frames)
        boundary = _boundary()
        top = media.split(";")[0]
        return Answer(
            HTTPStatus.OK,
            f'multipart/related; type="{top}"; boundary={boundary}',
            _multipart(boundary, ((media, [f]) for f in frames)),
        )

    def bulkdata(self, scope: Mapping[str, str], path: list[str], accept: str | None) -> Answer:
        """PS3.18 10.4.1.1.5: the value a BulkDataURI of :meth:`metadata` names."""
        (entry,) = self._found(scope)
        if path == [f"{_PIXEL_DATA:08X}"]:
            ds = header(entry.path)
            if not has_pixels(ds):
                raise LookupError("the instance has no pixel data")
            if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
                # Native pixel data is one value: all frames as stored (bit-packed for 1 bit).
                value = _native_value(entry.path)
                return _octets(value, accept)
            count = int(ds.get("NumberOfFrames") or 1)
            return self._pixel_parts(entry, ds, list(range(1, count + 1)), accept)
        return _octets(_walk(header(entry.path), path), accept)


def _replace_keys(query: Query, keys: tuple[Key, ...]) -> Query:
    return Query(keys, query.limit, query.offset, query.include, query.include_all)


def _values(element: DataElement) -> list[str]:
    value = element.value
    if value is None or value == "":
        return [""]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def has_pixels(ds: Dataset) -> bool:
    """Whether the instance holds pixel data (read with stop_before_pixels: Rows stands in)."""
    return "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds


def _pixel_vr(ds: Dataset) -> str:
    if stored_syntax(ds).is_encapsulated or int(ds.BitsAllocated) <= 8:
        return "OB"
    return "OW"


def decodable(syntax: UID) -> bool:
    """Whether pydicom, with the decoders installed here, can decode ``syntax``."""
    if not syntax.is_encapsulated:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def _to_json(ds: Dataset, instance_url: str | None, prefix: str = "") -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of ``ds``; binary values over :data:`BULK_THRESHOLD` become a
    BulkDataURI under ``instance_url`` (inline when None), nested ones by their path."""
    out: dict[str, Any] = {}
    for element in ds:
        tag = f"{int(element.tag):08X}"
        if element.tag.group in (0x0002,) or element.tag.element == 0:  # meta, group lengths
            continue
        if element.VR == "SQ":
            items = [
                _to_json(item, instance_url, f"{prefix}{tag}/{i + 1}/")
                for i, item in enumerate(element.value)
            ]
            out[tag] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        elif (
            instance_url is not None
            and element.VR in _BULK_VRS
            and element.value is not None
            and len(element.value) > BULK_THRESHOLD
        ):
            out[tag] = {"vr": element.VR, "BulkDataURI": f"{instance_url}/bulkdata/{prefix}{tag}"}
        else:
            try:
                out[tag] = element.to_json_dict(None, BULK_THRESHOLD)
            except (ValueError, TypeError, OverflowError) as exc:
                # A value pydicom cannot convert (an invalid DS or IS as some modalities write
                # them) goes out empty rather than failing the whole response.
                log.debug("DICOM JSON: %s of an instance left empty: %s", tag, exc)
                out[tag] = {"vr": element.VR}
    return out


def _walk(ds: Dataset, path: list[str]) -> bytes:
    """The value at a bulk data path: tag, then item number (from 1) and tag, repeatedly."""
    current: Dataset = ds
    sequence: Sequence[Dataset] = []
    for i, step in enumerate(path):
        if i % 2 == 0:
            if not re.fullmatch(r"[0-9A-Fa-f]{8}", step):
                raise ValueError(f"bulk data path step {step[:16]!r} is not a tag")
            tag = Tag(int(step, 16))
            if tag not in current:
                raise LookupError(f"no bulk data at {'/'.join(path)}")
            element = current[tag]
            if i == len(path) - 1:
                if element.VR not in _BULK_VRS or element.value is None:
                    raise LookupError(f"no bulk data at {'/'.join(path)}")
                return bytes(element.value)
            if element.VR != "SQ":
                raise LookupError(f"no bulk data at {'/'.join(path)}")
            sequence = element.value
        else:
            if not step.isdigit() or not 1 <= int(step) <= len(sequence):
                raise LookupError(f"no bulk data at {'/'.join(path)}")
            current = sequence[int(step) - 1]
    raise LookupError(f"no bulk data at {'/'.join(path)}")


# -- content negotiation (PS3.18 8.7) --------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: type, parameters (lower-case names), quality."""

    media_type: str
    params: Mapping[str, str]
    quality: float


def parse_accept(accept: str | None) -> list[MediaRange]:
    """The Accept header's entries, best first (RFC 9110 12.5.1); none when absent."""
    if accept is None or not accept.strip():
        return []
    ranges = []
    for index, text in enumerate(_split_outside_quotes(accept, ",")):
        pieces = _split_outside_quotes(text, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            raise ValueError(f"Accept: bad quality in {text.strip()[:80]!r}") from None
        ranges.append((-quality, index, MediaRange(media_type, params, quality)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (t[0], t[1])) if r.quality > 0]


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def _json_accepted(accept: str | None) -> Unacceptable | None:
    ranges = parse_accept(accept)
    if not ranges or any(
        r.media_type in (DICOM_JSON, "application/json", "application/*", "*/*") for r in ranges
    ):
        return None
    return Unacceptable(f"metadata is offered as {DICOM_JSON} only")


@dataclass(frozen=True)
class _Part10Wanted:
    syntaxes: tuple[str, ...]  # acceptable transfer syntaxes, best first; "*" = as stored
    single: bool  # a bare application/dicom body, not multipart


def _part10_syntaxes(accept: str | None, *, single: bool) -> _Part10Wanted | Unacceptable:
    ranges = parse_accept(accept)
    if not ranges:
        return _Part10Wanted((str(DEFAULT_SYNTAX),), False)
    syntaxes: list[str] = []
    bare = False
    for r in ranges:
        if r.media_type == "multipart/related":
            if r.params.get("type", PART10).lower() not in (PART10, "application/*", "*/*"):
                continue
        elif r.media_type == PART10:
            if not single:
                continue
            bare = bare or not syntaxes
        elif r.media_type not in ("*/*", "multipart/*"):
            continue
        syntaxes.append(r.params.get("transfer-syntax", str(DEFAULT_SYNTAX)))
    if not syntaxes:
        return Unacceptable(
            f'instances are offered as multipart/related; type="{PART10}"'
            + (f" or {PART10}" if single else ""),
        )
    return _Part10Wanted(tuple(syntaxes), bare)


def choose_syntax(stored: UID, wanted: Sequence[str], pixels: bool) -> UID | Unacceptable:
    """The first acceptable syntax we can give: as stored, or re-encoded to a native one
    (decompressed by pydicom when the stored one is compressed and a decoder is here)."""
    for syntax in wanted:
        if syntax == "*" or syntax == stored:
            return stored
        if syntax in NATIVE and (not pixels or decodable(stored)):
            return UID(syntax)
    return Unacceptable(
        f"an instance is stored as {stored} ({stored.name}); it can be sent as that or, "
        + ("decompressed, " if stored.is_encapsulated and decodable(stored) else "")
        + (
            f"as {', '.join(NATIVE)}"
            if not stored.is_encapsulated or decodable(stored)
            else "not decompressed: no decoder for it here"
        )
        + f"; asked for {', '.join(wanted)}",
    )


@dataclass(frozen=True)
class FrameChoice:
    encoded: bool  # the stored compressed bit stream, as is
    single: bool  # a bare body, not multipart
    media_type: str


def frame_choice(accept: str | None, stored: UID, can_decode: bool) -> FrameChoice | Unacceptable:
    compressed = stored.is_encapsulated
    stored_media = FRAME_MEDIA_TYPES.get(str(stored))
    ranges = parse_accept(accept) or [MediaRange("multipart/related", {"type": OCTETS}, 1.0)]
    for r in ranges:
        if r.media_type == "multipart/related":
            kind = r.params.get("type", OCTETS).lower()
            media, single = _MEDIA_ALIASES.get(kind, kind), False
        elif r.media_type in ("*/*", "multipart/*"):
            media, single = "*/*", False
        else:
            media, single = _MEDIA_ALIASES.get(r.media_type, r.media_type), True
        syntax = r.params.get("transfer-syntax")
        if compressed and stored_media is not None:
            # The stored bit stream as it is: asked by its media type, or by "*" (any syntax
            # the server likes, PS3.18 8.7.3.5.2) or the stored syntax's UID.
            by_type = media in (stored_media, "image/*") and syntax in (None, "*", str(stored))
            by_syntax = media in (OCTETS, "*/*") and syntax in ("*", str(stored))
            if by_type or by_syntax:
                return FrameChoice(True, single, stored_media)
        native = syntax in (None, "*", str(DEFAULT_SYNTAX)) or (
            not compressed and syntax == str(stored)
        )
        if media in (OCTETS, "*/*", "application/*") and native and (not compressed or can_decode):
            return FrameChoice(False, single, OCTETS)
        if compressed and stored_media is not None and media == "*/*":
            return FrameChoice(True, single, stored_media)
    reason = f"the frames are stored as {stored} ({stored.name})"
    if compressed:
        reason += f", offered as {stored_media or OCTETS} as stored"
        reason += (
            " or decompressed as application/octet-stream"
            if can_decode
            else " (no decoder here to decompress them)"
        )
    else:
        reason += f", offered as {OCTETS} (transfer-syntax {DEFAULT_SYNTAX})"
    return Unacceptable(reason)


def _octets(value: bytes, accept: str | None) -> Answer:
    """Bulk data: one application/octet-stream part, or a bare body when the client does not
    ask for multipart (OHIF's single-part bulk data mode sends */*)."""
    ranges = parse_accept(accept)
    if any(r.media_type == "multipart/related" for r in ranges):
        if not any(
            r.media_type == "multipart/related"
            and r.params.get("type", OCTETS).lower() in (OCTETS, "*/*")
            for r in ranges
        ):
            return _not_acceptable(Unacceptable(f"bulk data is offered as {OCTETS}"))
        boundary = _boundary()
        return Answer(
            HTTPStatus.OK,
            f'multipart/related; type="{OCTETS}"; boundary={boundary}',
            _multipart(boundary, [(OCTETS, [value])]),
        )
    if ranges and not any(r.media_type in (OCTETS, "application/*", "*/*") for r in ranges):
        return _not_acceptable(Unacceptable(f"bulk data is offered as {OCTETS}"))
    return Answer(HTTPStatus.OK, OCTETS, value)


# -- bodies ------------------------------------------------------------------------------------


def _boundary() -> str:
    return f"dicom-node-{secrets.token_hex(12)}"


def _multipart(boundary: str, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """A multipart/related body (RFC 2387), each part's bytes yielded as they come."""
    for media, pieces in parts:
        yield f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode()
        yield from pieces
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _part10(path: Path, syntax: UID) -> Iterator[bytes]:
    """The stored file as it is (read in pieces), or re-encoded in ``syntax``."""
    ds = header(path)
    if stored_syntax(ds) == syntax:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        return
    yield _reencoded(path, syntax)


def _reencoded(path: Path, syntax: UID) -> bytes:
    """The instance in a native ``syntax``: decompressed, or byte order and VR encoding
    changed, by pydicom (PS3.18 8.7.3.5: the origin server converts when asked)."""
    ds = dcmread(path)
    stored = stored_syntax(ds)
    if (
        has_pixels(ds)
        and "PixelData" in ds
        and (stored.is_encapsulated or stored == ExplicitVRBigEndian)
    ):
        ds.PixelData = _little_endian_pixels(ds)
        if (
            stored.is_encapsulated
            and str(ds.get("PhotometricInterpretation", "")).startswith("YBR")
            and ds.get("SamplesPerPixel", 1) == 3
        ):
            ds.PhotometricInterpretation = "YBR_FULL"  # decoded, no longer subsampled
        ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
        if "PlanarConfiguration" in ds:
            ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    # force_encoding: pydicom's save_as will not change byte order; the pixel data are swapped
    # above, other values are written again from their parsed form.
    dcmwrite(
        buffer,
        ds,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=True,
        force_encoding=True,
    )
    return buffer.getvalue()


def _little_endian_dtype(ds: Dataset) -> np.dtype[Any]:
    bits = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return np.dtype(f"<{'i' if signed else 'u'}{max(1, bits // 8)}")


def _little_endian_pixels(ds: Dataset) -> bytes:
    """All of ``ds``'s pixels decoded, as native little-endian bytes (PS3.5 8.1.1, A.1)."""
    return pixel_array(ds, raw=True).astype(_little_endian_dtype(ds)).tobytes()


def _native_value(path: Path) -> bytes:
    """The Pixel Data value as little-endian native bytes (PS3.5 8.1.1)."""
    ds = dcmread(path)
    stored = stored_syntax(ds)
    if stored == ExplicitVRBigEndian and int(ds.BitsAllocated) > 8:
        return _little_endian_pixels(ds)
    return bytes(ds.PixelData)


def _frames(path: Path, numbers: list[int], *, keep_encoded: bool) -> list[bytes]:
    """The frames ``numbers`` (from 1): their compressed bit streams when ``keep_encoded``,
    else native little-endian bytes (a 1-bit frame packed on its own, PS3.5 8.1.1)."""
    ds = dcmread(path)
    stored = stored_syntax(ds)
    count = int(ds.get("NumberOfFrames") or 1)
    if keep_encoded:
        encoded = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [encoded[n - 1] for n in numbers]
    bits = int(ds.BitsAllocated)
    if not stored.is_encapsulated and stored != ExplicitVRBigEndian and bits != 1:
        raw = bytes(ds.PixelData)
        size = get_expected_length(ds, "bytes") // count  # YBR_FULL_422 is 2 bytes a pixel
        return [raw[(n - 1) * size : n * size] for n in numbers]
    out = []
    for n in numbers:
        frame = pixel_array(ds, index=n - 1, raw=True)
        if bits == 1:
            out.append(np.packbits(frame.astype(np.uint8).ravel(), bitorder="little").tobytes())
        else:
            out.append(frame.astype(_little_endian_dtype(ds)).tobytes())
    return out
