"""The DICOMweb read side's request parsing on its own: QIDO-RS matching (PS3.4 C.2.2.2 as
PS3.18 8.3.4 uses it) and Accept negotiation (PS3.18 8.7), against the standard's own
examples. The node-backed behaviour is tests/test_dicomweb_read.py."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from dicom_node.dicomweb import (
    Key,
    Query,
    Unacceptable,
    choose_syntax,
    frame_choice,
    parse_accept,
)

pytestmark = pytest.mark.unit

JPEG_LS = UID("1.2.840.10008.1.2.4.80")
EXPLICIT = UID("1.2.840.10008.1.2.1")
IMPLICIT = UID("1.2.840.10008.1.2")
JPEG_EXTENDED = UID("1.2.840.10008.1.2.4.51")


@pytest.mark.parametrize(
    ("name", "query", "value", "expected"),
    [
        ("PatientID", "", "anything", True),  # universal
        ("PatientID", "P1", "P1", True),
        ("PatientID", "P1", "p1", False),  # case-sensitive but for PN
        ("PatientName", "doe^jane", "DOE^JANE", True),
        ("PatientName", "DOE*", "DOE^JANE", True),
        ("PatientName", "D?E^JANE", "DOE^JANE", True),
        ("PatientName", "X*", "DOE^JANE", False),
        ("StudyDate", "20240101-20240131", "20240115", True),
        ("StudyDate", "20240101-20240131", "20240201", False),
        ("StudyDate", "20240101-", "20250101", True),
        ("StudyDate", "-20240101", "20240101", True),
        ("StudyDate", "-20240101", "20240102", False),
        ("StudyDate", "20240101-", "", False),
        ("StudyTime", "0800-0900", "083015.123", True),
        ("StudyTime", "0800-0900", "090000", True),
        ("StudyTime", "0800-0900", "090100", False),
        ("StudyInstanceUID", "1.2.3,1.2.4", "1.2.4", True),
        ("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.5", False),
        ("0020000D", "1.2.3", "1.2.3", True),
        ("0020000d", "1.2.3", "1.2.3", True),
        ("Modality", "CT,MR", "MR", True),
        ("AccessionNumber", "A[1]", "A[1]", True),  # brackets are no pattern here
    ],
)
def test_matching(name: str, query: str, value: str, expected: bool) -> None:
    assert Key.parse(name, query).matches([value]) is expected


def test_a_multi_valued_attribute_matches_when_any_value_does() -> None:
    assert Key.parse("ModalitiesInStudy", "SEG").matches(["CT", "SEG", "SR"])
    assert not Key.parse("ModalitiesInStudy", "MR").matches(["CT", "SEG", "SR"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"NoSuchKeyword": ["1"]}, "neither a keyword nor a tag"),
        ({"FFFFFFFF": ["1"]}, "no such attribute"),
        ({"ReferencedSeriesSequence": ["1"]}, "sequence matching"),
        ({"limit": ["-1"]}, "limit out of range"),
        ({"limit": ["many"]}, "limit must be a whole number"),
        ({"offset": ["x"]}, "offset must be a whole number"),
    ],
)
def test_bad_query_parameters_are_refused_by_name(params, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Query.parse(params)


def test_control_parameters_and_unknown_include_fields() -> None:
    query = Query.parse(
        {
            "limit": ["5"],
            "offset": ["10"],
            "fuzzymatching": ["false"],
            "includefield": ["00081030,Modality", "NoSuchAttribute", "all"],
            "PatientID": ["P*"],
        }
    )
    assert (query.limit, query.offset, query.include_all) == (5, 10, True)
    assert query.include == (0x00081030, 0x00080060)
    assert [k.keyword for k in query.keys] == ["PatientID"]


def test_accept_entries_come_best_first_with_quoted_parameters() -> None:
    ranges = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80;'
        ' q=0.5, multipart/related; type="application/dicom, x"; q=0.9, */*; q=0'
    )
    assert [(r.media_type, r.params.get("type"), r.quality) for r in ranges] == [
        ("multipart/related", "application/dicom, x", 0.9),
        ("multipart/related", "application/dicom", 0.5),
    ]


def test_part10_syntax_is_as_stored_or_a_native_re_encoding() -> None:
    assert choose_syntax(JPEG_LS, ["*"], True) == JPEG_LS
    assert choose_syntax(JPEG_LS, [str(EXPLICIT)], True) == EXPLICIT  # decompressed
    assert choose_syntax(IMPLICIT, [str(EXPLICIT)], True) == EXPLICIT
    assert choose_syntax(EXPLICIT, [str(IMPLICIT)], True) == IMPLICIT
    # Compressing is not offered: a 406 naming what is.
    refused = choose_syntax(EXPLICIT, [str(JPEG_LS)], True)
    assert isinstance(refused, Unacceptable) and "1.2.840.10008.1.2.4.80" in refused.reason


@pytest.mark.parametrize(
    ("accept", "stored", "encoded", "single"),
    [
        (None, EXPLICIT, False, False),
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            JPEG_LS,
            True,
            False,
        ),
        ("multipart/related; type=application/octet-stream", JPEG_LS, False, False),
        ('multipart/related; type="image/jls"', JPEG_LS, True, False),
        ('multipart/related; type="image/x-jls"', JPEG_LS, True, False),
        ("image/jls", JPEG_LS, True, True),
        ("application/octet-stream", EXPLICIT, False, True),
        ("*/*", JPEG_LS, False, False),
        ("multipart/related; type=image/jpeg", JPEG_EXTENDED, True, False),
    ],
)
def test_frame_media_types(accept, stored: UID, encoded: bool, single: bool) -> None:
    choice = frame_choice(accept, stored, can_decode=True)
    assert not isinstance(choice, Unacceptable)
    assert (choice.encoded, choice.single) == (encoded, single)


def test_frames_that_cannot_be_decoded_are_offered_as_stored_only() -> None:
    choice = frame_choice("multipart/related; type=application/octet-stream", JPEG_LS, False)
    assert isinstance(choice, Unacceptable)
    assert "image/jls" in choice.reason and "no decoder" in choice.reason
    assert not isinstance(frame_choice("*/*", JPEG_LS, False), Unacceptable)
    assert isinstance(
        frame_choice("multipart/related; type=image/jp2", JPEG_LS, True), Unacceptable
    )
