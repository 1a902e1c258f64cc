"""The header scan (dicom_node.header_scan) against pydicom's parse, which it replaces for
regular data sets: on every real-world file at hand, and on mutated data sets, storing must
give the same header, or the same refusal in the same words, whichever way it is read."""

from __future__ import annotations

import warnings
from copy import deepcopy
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.errors import InvalidInstance
from dicom_node.header_scan import scan
from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.store import InstanceHeader, _dataset_offset, _parse_header, read_header
from tests.support.paths import CORPUS
from tests.support.realworld import is_part10, public_files

pytestmark = pytest.mark.unit


def by_pydicom(data: bytes, syntax: UID) -> InstanceHeader | str:
    try:
        return _parse_header(BytesIO(data), len(data), syntax)
    except InvalidInstance as exc:
        return str(exc)


def as_stored(data: bytes, syntax: UID) -> InstanceHeader | str:
    try:
        return read_header(data, syntax)
    except InvalidInstance as exc:
        return str(exc)


def real_files() -> list[Path]:
    corpus = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.stat().st_size > 132)
    return [f.path for f in public_files()] + [p for p in corpus if is_part10(p)]


def test_the_same_header_as_pydicom_on_every_real_file() -> None:
    files, scanned = real_files(), 0
    assert len(files) > 300
    for path in files:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        if "TransferSyntaxUID" not in meta:
            continue  # not sendable as it is: no transfer syntax to negotiate
        syntax = UID(str(meta.TransferSyntaxUID))
        data = path.read_bytes()[_dataset_offset(path) :]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert as_stored(data, syntax) == by_pydicom(data, syntax), path
            regular = syntax.is_little_endian and not syntax.is_deflated
            scanned += regular and scan(data, implicit=syntax.is_implicit_VR) is not None
    # Most real files are regular: the scan, not pydicom, reads them.
    assert scanned > 0.8 * len(files), f"{scanned} of {len(files)} scanned"


def nested_slice() -> Dataset:
    """A small CT slice with sequences two levels deep, as real headers have."""
    ds = next(ct_series(CtPhantomSpec(slices=1, rows=16, columns=16)))
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    inner = Dataset()
    inner.ReferencedSOPClassUID = ds.SOPClassUID
    inner.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    inner.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([inner, inner])
    ds.AnatomicRegionSequence = Sequence([code])
    return ds


def with_defined_lengths(ds: Dataset) -> Dataset:
    """``ds`` with every sequence and item of defined length, as dcmtk re-encodes them."""
    ds = deepcopy(ds)

    def define(items: Dataset) -> None:
        for element in items:
            if element.VR == "SQ":
                element.is_undefined_length = False
                for item in element.value:
                    item.is_undefined_length_sequence_item = False
                    define(item)

    define(ds)
    return ds


def encoded(ds: Dataset, syntax: UID) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


SLICE = nested_slice()
# Implicit VR with defined-length sequences: only the data dictionary says they are sequences.
ENCODED = {
    (syntax, defined): encoded(with_defined_lengths(SLICE) if defined else SLICE, syntax)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    for defined in (False, True)
}


def test_a_regular_slice_is_scanned_not_parsed() -> None:
    for (syntax, _), data in ENCODED.items():
        assert scan(data, implicit=syntax.is_implicit_VR) is not None
        assert as_stored(data, syntax) == by_pydicom(data, syntax)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encoding=st.sampled_from(sorted(ENCODED)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_data_sets_are_stored_or_refused_as_pydicom_would(
    encoding: tuple[UID, bool], flips: list[tuple[float, int]], cut: float | None
) -> None:
    syntax = encoding[0]
    data = bytearray(ENCODED[encoding])
    header_end = data.index(b"\xe0\x7f\x10\x00")  # flip in the header, where the scan works
    for where, xor in flips:
        data[int(where * header_end)] ^= xor
    if cut is not None:
        data = data[: int(cut * len(data))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert as_stored(bytes(data), syntax) == by_pydicom(bytes(data), syntax)
