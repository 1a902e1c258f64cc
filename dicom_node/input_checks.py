"""What the node checks in a stored series before an algorithm may use it, and why.

A header that does not describe its pixel data, UIDs that cannot place a result, geometry
that is not one volume: each is an :class:`InputError` naming the attribute (PS3.3 C.7.6.3
Image Pixel, C.11 LUTs, C.7.6.2 Image Plane), raised before anything is decoded or guessed
at, so the job fails with a reason a person can act on instead of a misplaced result.
:class:`dicom_node.algorithm.SeriesInput` runs these checks when an algorithm first reads its
input; the plugin API re-exports :class:`~dicom_node.errors.InputError`, which plugins raise too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from io import BytesIO

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from dicom_node.errors import InputError

# The most voxels (Rows x Columns x frames x samples, over a series) the node decodes: 2^30,
# 4 GiB as float32, above any CT or MR a model takes (512 x 512 x 4096).
# Compressed pixel data can claim any size in a few bytes, so the claim is checked first.
MAX_VOXELS = 2**30
_BITS_ALLOCATED = (1, 8, 16, 32, 64)


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    """``ds``'s element ``keyword``, None when absent, InputError when it cannot be read."""
    try:
        return ds[keyword]
    except KeyError:
        return None
    except Exception as exc:  # a value whose bytes do not fit its VR (3 bytes for a US)
        raise InputError(f"{keyword} cannot be read: not a valid value for its VR") from exc


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An Image Pixel module attribute as a positive integer, or InputError naming it."""
    element = _element(ds, keyword)
    value = element.value if element is not None else None
    if value in (None, "") and default is not None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    vr = element.VR if element is not None else None
    shown = "missing" if element is None else f"{str(value)[:32]!r} (VR {vr})"
    raise InputError(f"{keyword} is {shown}, not a positive integer")


# PS3.3 C.7.6.3.1.2, the terms pydicom decodes.
PHOTOMETRIC_INTERPRETATIONS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
    }
)
VOI_LUT_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})  # PS3.3 C.11.2.1.3


def _pixel_problem(ds: Dataset) -> tuple[int, str | None]:
    """(voxels the header claims, why its pixel data cannot be what the header says or None).

    Each reason names the attribute (PS3.3 C.7.6.3 Image Pixel, C.11.1 Modality LUT, C.11.2
    VOI LUT): these describe how stored values become what a model and a reader see, and a
    guess would change the picture.
    """
    element = _element(ds, "PixelData")
    if element is None:
        return 0, "no Pixel Data (PixelData)"
    if element.is_empty:
        return 0, "PixelData is empty"
    rows = _positive_int(ds, "Rows")
    columns = _positive_int(ds, "Columns")
    frames = _positive_int(ds, "NumberOfFrames", default=1)
    samples = _positive_int(ds, "SamplesPerPixel")
    bits = _positive_int(ds, "BitsAllocated")
    if bits not in _BITS_ALLOCATED:
        return 0, f"BitsAllocated is {bits}, not one of {_BITS_ALLOCATED}"
    if bits > 1 and not 1 <= _positive_int(ds, "BitsStored") <= bits:
        return 0, f"BitsStored is more than BitsAllocated ({bits})"
    representation = _element(ds, "PixelRepresentation")
    if representation is None or representation.value not in (0, 1):
        return 0, "PixelRepresentation is missing or neither 0 nor 1"
    photometric = _element(ds, "PhotometricInterpretation")
    if photometric is None or str(photometric.value).strip() not in PHOTOMETRIC_INTERPRETATIONS:
        return 0, "PhotometricInterpretation is missing or not a defined term"
    planar = _element(ds, "PlanarConfiguration")  # read by the decoder whatever the samples
    if samples > 1 and (planar is None or planar.value not in (0, 1)):
        return 0, "PlanarConfiguration is missing or neither 0 nor 1"
    problem = _lookup_problem(ds)
    if problem is not None:
        return 0, problem
    voxels = rows * columns * frames * samples
    syntax = UID(ds.file_meta.get("TransferSyntaxUID") or "")
    compressed = syntax.is_encapsulated if syntax else element.is_undefined_length
    if compressed != element.is_undefined_length:
        if compressed:
            return voxels, (
                f"transfer syntax {syntax.name} says the pixel data is compressed, but it "
                "is not encapsulated (uncompressed data sent under a compressed syntax?)"
            )
        return voxels, f"pixel data is encapsulated under the uncompressed {syntax.name}"
    if not compressed:
        expected = (voxels * bits + 7) // 8
        if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            expected = expected * 2 // 3  # two samples per pixel as stored (PS3.3 C.7.6.3.1.2)
        length = len(element.value)
        if length not in (expected, expected + expected % 2):  # one byte pads to even length
            return voxels, (
                f"pixel data is {length} bytes where Rows x Columns x frames x samples x bits "
                f"({rows} x {columns} x {frames} x {samples} x {bits}) make {expected}: the "
                "header does not describe the pixel data"
            )
    return voxels, None


def check_identity(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`InputError` unless every instance holds the UIDs that place it and its
    results: SOP Class, SOP Instance, Study and Series Instance UIDs (PS3.3 C.12.1, C.7.2.1,
    C.7.3.1), each a valid UID (PS3.5 9.1). A result cannot be put in a study it cannot name.
    """
    from dicom_node.copied import unusable_uids

    for ds in datasets:
        unusable = unusable_uids(ds)
        if unusable:
            raise InputError(f"an instance's {unusable[0]}: its results could not be placed")


def _lookup_problem(ds: Dataset) -> str | None:
    """Why the Modality LUT, VOI LUT or extended offset table cannot be applied, or None."""
    function = _element(ds, "VOILUTFunction")
    if function is not None and str(function.value).strip() not in VOI_LUT_FUNCTIONS:
        return "VOILUTFunction is not a defined term"
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        sequence = _element(ds, keyword)
        if sequence is None:
            continue
        for item in sequence.value:
            if not (item.get("LUTDescriptor") and item.get("LUTData")):
                return f"{keyword} has an item without LUTDescriptor or LUTData"
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        element = _element(ds, keyword)
        if element is not None and not element.is_empty:
            value = _finite([element.value], 1)
            if value is None or (keyword == "RescaleSlope" and value[0] == 0):
                return f"{keyword} is not a finite number (nor 0, for a slope)"
    mappings = _element(ds, "RealWorldValueMappingSequence")
    if mappings is not None and not (
        mappings.value
        and all(
            ("RealWorldValueSlope" in item and "RealWorldValueIntercept" in item)
            or "RealWorldValueLUTData" in item
            for item in mappings.value
        )
    ):
        return "RealWorldValueMappingSequence has no item, or one with no mapping"
    profile = _element(ds, "ICCProfile")
    if profile is not None and profile.is_empty:
        return "ICCProfile is empty"
    table = _element(ds, "ExtendedOffsetTable")
    lengths = _element(ds, "ExtendedOffsetTableLengths")
    if (table is None) != (lengths is None) or (table is not None and table.is_empty):
        return "ExtendedOffsetTable and ExtendedOffsetTableLengths do not come together"
    return None


def check_pixel_data(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`InputError` unless every instance's header describes its pixel data and
    the series claims at most :data:`MAX_VOXELS`; nothing is decoded."""
    voxels, problems = 0, []
    for ds in datasets:
        try:
            claimed, problem = _pixel_problem(ds)
        except InputError as exc:
            claimed, problem = 0, str(exc)
        voxels += claimed
        if problem is not None:
            problems.append(problem)
    if problems:
        raise InputError(f"{len(problems)} of {len(datasets)} instance(s): {problems[0]}")
    if voxels > MAX_VOXELS:
        raise InputError(
            f"the series claims {voxels} voxels (Rows x Columns x frames x samples), more than "
            f"the {MAX_VOXELS} the node decodes: a corrupt header or a decompression bomb"
        )


def _finite(value: object, count: int) -> np.ndarray | None:
    """``value`` as ``count`` finite numbers, or None (missing, wrong count, not numbers)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return None  # a text VR holding one value: its characters are not coordinates
    try:
        numbers = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def _valid_uid(value: object) -> bool:
    """A UID as PS3.5 9.1 writes it (the results copy the frame of reference). pydicom gives a
    UI value as a UID (it has warned already when the value is not one): made anew from it, the
    UID would warn a second time."""
    return isinstance(value, UID) and value.is_valid


def check_geometry(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`InputError` unless single-frame images can be placed as one volume.

    highdicom's own errors for these cases name an attribute at best or fail with a database
    error; a person reading a failed job needs the reason. Enhanced multi-frame images keep
    their geometry in functional groups and are left to highdicom.
    """
    classic = [ds for ds in datasets if "PerFrameFunctionalGroupsSequence" not in ds]
    if not classic:
        return
    total = len(datasets)

    def fail(count: int, what: str) -> None:
        if count:
            raise InputError(f"{count} of {total} instance(s) {what}")

    positions = [_finite(ds.get("ImagePositionPatient"), 3) for ds in classic]
    fail(
        sum(p is None for p in positions),
        "have no usable ImagePositionPatient: they cannot be placed in patient space",
    )
    orientations = [_finite(ds.get("ImageOrientationPatient"), 6) for ds in classic]
    fail(
        sum(
            o is None
            or not np.allclose(np.linalg.norm(o.reshape(2, 3), axis=1), 1.0, atol=1e-2)
            or abs(float(np.dot(o[:3], o[3:]))) > 1e-2
            for o in orientations
        ),
        "have no ImageOrientationPatient of two perpendicular unit directions",
    )
    spacings = [_finite(ds.get("PixelSpacing"), 2) for ds in classic]
    fail(
        sum(s is None or bool((s <= 0).any()) for s in spacings),
        "have a PixelSpacing that is missing, not a number, or not positive",
    )
    fail(
        sum(not _valid_uid(ds.get("FrameOfReferenceUID")) for ds in classic),
        "have no valid FrameOfReferenceUID: their positions are in no stated frame",
    )
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frames_of_reference) > 1:
        raise InputError(
            f"the instances are in {len(frames_of_reference)} frames of reference: not one "
            "volume, so they are not put together"
        )
    # Rounded to a micrometre: the same slice sent twice (new UIDs) or a second stack.
    placed = [p for p in positions if p is not None]  # all of them, checked above
    unique = np.unique(np.round(np.stack(placed), 3), axis=0)
    fail(
        len(classic) - len(unique),
        "repeat another's ImagePositionPatient (a slice sent twice, or two stacks): not one "
        "volume, so that no result lands on the wrong slice",
    )


def little_endian(ds: Dataset) -> Dataset:
    """``ds`` itself, or for Explicit VR Big Endian a little-endian copy with the same pixels."""
    if ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian:
        return ds
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    buffer = BytesIO()
    dcmwrite(buffer, ds, little_endian=True, implicit_vr=False, force_encoding=True)
    buffer.seek(0)
    return dcmread(buffer)
