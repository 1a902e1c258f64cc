"""The identifying attributes of a data set, found by walking its element headers.

Storing an instance needs eight attributes (the UIDs, Modality, Series Number and
Description, Patient ID) and the certainty that pydicom can parse the whole data set later.
pydicom's ``read_dataset`` builds an element object for every attribute, and took about half
of the store's time for a CT slice. :func:`scan` instead steps from element header to element
header (PS3.5 7.1: tag, VR, length), into every sequence and item (PS3.5 7.5) and over Pixel
Data's fragments (PS3.5 A.4), and keeps the raw bytes of the wanted attributes only; those
become pydicom elements, so their values are decoded exactly as pydicom decodes them.

The scan handles the regular encodings of little-endian data sets and nothing else: anything
it does not expect (an unknown VR, an element of undefined length that is not a sequence, a
sequence nested deeper than :data:`MAX_DEPTH`, a delimiter out of place, a length past the end,
a wanted attribute in another VR than its dictionary's) returns None, and the caller parses
the data set with pydicom, which decides and words the refusal. A test holds the two to the
same header on every file of the corpus and of pydicom's and pynetdicom's test data.
"""

from __future__ import annotations

import re
import struct
from functools import cache

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.errors import IrregularDataSet

# PS3.5 7.1.2: these VRs have 2 reserved bytes and a 32-bit length in explicit VR.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Real data nests a few levels; deeper is left to pydicom, which refuses what it cannot read.
MAX_DEPTH = 16

# The attributes InstanceHeader reads, and Specific Character Set, which decodes the text ones.
WANTED = {
    0x00080005: b"CS",  # SpecificCharacterSet
    0x00080016: b"UI",  # SOPClassUID
    0x00080018: b"UI",  # SOPInstanceUID
    0x00080060: b"CS",  # Modality
    0x0008103E: b"LO",  # SeriesDescription
    0x00100020: b"LO",  # PatientID
    0x0020000D: b"UI",  # StudyInstanceUID
    0x0020000E: b"UI",  # SeriesInstanceUID
    0x00200011: b"IS",  # SeriesNumber
}

_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


@cache
def is_sequence_tag(tag: int) -> bool:
    """Whether an implicit-VR element is a sequence, as pydicom decides: by its dictionary
    VR; an unknown private tag is read as UN, never as items."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


class _Scan:
    def __init__(self, data: bytes | memoryview, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.wanted: dict[int, tuple[bytes, int, int]] = {}  # tag -> (VR, offset, length)

    def element(self, pos: int, limit: int) -> tuple[int, bytes | None, int, int]:
        """The element header at ``pos``: (tag, VR or None when implicit, length, value
        offset)."""
        if pos + 8 > limit:
            raise IrregularDataSet
        group, number = _TAG.unpack_from(self.data, pos)
        tag = group << 16 | number
        if self.implicit or group == 0xFFFE:  # item and delimiter tags carry no VR
            return tag, None, _U32.unpack_from(self.data, pos + 4)[0], pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in _SHORT_VRS:
            return tag, vr, _U16.unpack_from(self.data, pos + 6)[0], pos + 8
        if vr in _LONG_VRS and pos + 12 <= limit:
            return tag, vr, _U32.unpack_from(self.data, pos + 8)[0], pos + 12
        raise IrregularDataSet

    def dataset(self, pos: int, end: int, depth: int, *, delimited: bool) -> int:
        """Walk a data set from ``pos`` to ``end`` (or, ``delimited``, to its item
        delimiter); the position after it."""
        top = depth == 0
        before_pixels = top
        while pos < end:
            tag, vr, length, pos = self.element(pos, end)
            if tag >> 16 == 0xFFFE:
                if delimited and tag == ITEM_END and length == 0:
                    return pos
                raise IrregularDataSet
            if top and tag >= PIXEL_DATA:
                before_pixels = False  # pydicom's header stops at the first such tag
                if tag == PIXEL_DATA:
                    pos = self.pixel_data(pos, length, end)
                    continue
            if vr == b"SQ" or (vr is None and (length == UNDEFINED or is_sequence_tag(tag))):
                pos = self.sequence(pos, length, end, depth + 1)
                continue
            if length == UNDEFINED or pos + length > end:
                raise IrregularDataSet
            if before_pixels and tag in WANTED:
                if vr is not None and vr != WANTED[tag]:
                    raise IrregularDataSet
                self.wanted[tag] = (WANTED[tag], pos, length)
            pos += length
        if delimited or pos != end:
            raise IrregularDataSet
        return pos

    def sequence(self, pos: int, length: int, limit: int, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise IrregularDataSet
        end = limit if length == UNDEFINED else pos + length
        if end > limit:
            raise IrregularDataSet
        while True:
            if length != UNDEFINED and pos == end:
                return pos
            tag, _, item_length, pos = self.element(pos, end)
            if tag == SEQUENCE_END and length == UNDEFINED and item_length == 0:
                return pos
            if tag != ITEM:
                raise IrregularDataSet
            if item_length == UNDEFINED:
                pos = self.dataset(pos, end, depth, delimited=True)
            else:
                if pos + item_length > end:
                    raise IrregularDataSet
                pos = self.dataset(pos, pos + item_length, depth, delimited=False)

    def pixel_data(self, pos: int, length: int, limit: int) -> int:
        if length != UNDEFINED:
            if pos + length > limit:
                raise IrregularDataSet
            return pos + length
        while True:  # encapsulated: items, then a sequence delimiter (PS3.5 A.4)
            if pos + 8 > limit:
                raise IrregularDataSet
            group, number = _TAG.unpack_from(self.data, pos)
            item_length = _U32.unpack_from(self.data, pos + 4)[0]
            pos += 8
            tag = group << 16 | number
            if tag == SEQUENCE_END:
                return pos
            if tag != ITEM or item_length == UNDEFINED or pos + item_length > limit:
                raise IrregularDataSet
            pos += item_length


def explicit_element(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """The explicit VR little endian element header at ``pos`` (PS3.5 7.1.2): its tag, value
    length and value offset. Raises :class:`IrregularDataSet` for an unknown VR or a header
    that does not fit in ``data``."""
    tag, _, length, offset = _Scan(data, implicit=False).element(pos, len(data))
    return tag, length, offset


def scan(data: bytes | memoryview, *, implicit: bool) -> dict[int, bytes] | None:
    """The raw values of the wanted attributes of a little-endian data set (no file meta), by
    tag, or None when the data set is not one the scan handles."""
    walk = _Scan(data, implicit)
    try:
        walk.dataset(0, len(data), 0, delimited=False)
    except (IrregularDataSet, struct.error):
        return None
    return {tag: bytes(data[at : at + length]) for tag, (_, at, length) in walk.wanted.items()}


def as_dataset(values: dict[int, bytes], *, implicit: bool) -> Dataset:
    """Scanned values as a pydicom data set of raw elements, decoded as pydicom decodes them."""
    return Dataset(
        {
            Tag(tag): RawDataElement(
                Tag(tag),
                None if implicit else WANTED[tag].decode(),
                len(value),
                value,
                0,
                implicit,
                True,
            )
            for tag, value in values.items()
        }
    )


_PLAIN = re.compile(rb"[ -\[\]-~]*\0?")  # printable ASCII but backslash; a UID's NUL pad
_INTEGER = re.compile(r" *[+-]?[0-9]{1,12} *")


def plain_text(values: dict[int, bytes]) -> dict[int, str] | None:
    """The scanned values as text when each is one printable-ASCII value (no backslash, so
    one value), which every character set decodes alike and pydicom returns with trailing
    spaces and NULs removed; else None (pydicom decodes them: :func:`as_dataset`)."""
    text = {}
    for tag, value in values.items():
        if not _PLAIN.fullmatch(value):
            return None
        text[tag] = value.decode("ascii").rstrip("\0 ")
    number = text.get(0x00200011, "")
    if number and not _INTEGER.fullmatch(number):
        return None
    return text
