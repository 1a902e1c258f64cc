"""Data sets as bytes, exactly as built: pydicom's encoding of a data set, and elements written
by hand in explicit VR little endian (PS3.5 7.1.2) with whatever VR or length a test needs."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian


def encoded(ds, syntax=ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element with the VR given, whatever the data dictionary says."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", group, number, vr, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def _item(tag: int, length: int) -> bytes:
    return struct.pack("<HHI", 0xFFFE, tag, length)


def deep_sequence(tag: int, depth: int) -> bytes:
    """``tag`` as a sequence holding an item holding the sequence … ``depth`` deep, all of
    undefined length and properly closed: valid DICOM that pydicom cannot read (it recurses)."""
    group, number = tag >> 16, tag & 0xFFFF
    opening = struct.pack("<HH2s2xI", group, number, b"SQ", _UNDEFINED) + _item(0xE000, _UNDEFINED)
    closing = _item(0xE00D, 0) + _item(0xE0DD, 0)
    return opening * depth + closing * depth


def encapsulated_pixel_data(*fragments: bytes) -> bytes:
    """Pixel Data as compressed syntaxes carry it (PS3.5 A.4): empty offset table, fragments."""
    body = _item(0xE000, 0) + b"".join(_item(0xE000, len(f)) + f for f in fragments)
    return struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", _UNDEFINED) + body + _item(0xE0DD, 0)


def top_level(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(tag, start, end) of each top-level element of explicit VR little endian data whose
    elements all have defined lengths (as the phantoms are written)."""
    offset = 0
    while offset < len(data):
        group, number, vr = struct.unpack_from("<HH2s", data, offset)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        yield (group << 16) | number, offset, start + length
        offset = start + length


def put(data: bytes, tag: int, raw: bytes) -> bytes:
    """``data`` with element ``tag`` replaced by the bytes ``raw``, or ``raw`` inserted where
    the tag order puts it."""
    for found, start, end in top_level(data):
        if found == tag:
            return data[:start] + raw + data[end:]
        if found > tag:
            return data[:start] + raw + data[start:]
    return data + raw


def cut_before(data: bytes, tag: int) -> bytes:
    """``data`` up to (not including) element ``tag``: a data set cut short there."""
    return next(data[:start] for found, start, _ in top_level(data) if found == tag)
