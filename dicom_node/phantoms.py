"""Synthetic, patient-free DICOM studies for tests, benchmarks and the commissioning self-test.

The CT phantom is an axial chest-like series: an elliptical body of soft tissue (40 HU) with
two air-filled lungs (-850 HU), written as valid CT Image Storage instances (PS3.3 A.3) in
Explicit VR Little Endian. Its UIDs are new for every call unless given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicom_node.store import IMPLEMENTATION_CLASS_UID

if TYPE_CHECKING:  # imported when drawn: it needs scipy, which the node itself does not
    from dicom_node.ct_anatomy import ChestAnatomy


@dataclass(frozen=True)
class Nodule:
    """A solid spherical nodule: centre in patient LPS mm, diameter in mm."""

    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    hu: float = 30.0


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Pose:
    """Where the patient lies in the scanner, relative to where the phantom is drawn: turned by
    ``rotation_deg`` about the long (S) axis through the origin, then moved by ``shift_mm``
    (LPS). A second scan of one patient is another pose of the same body."""

    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_deg: float = 0.0

    def matrix(self) -> np.ndarray:
        """4 x 4: body coordinates (LPS mm) -> scanner coordinates."""
        angle = np.radians(self.rotation_deg)
        cos, sin = np.cos(angle), np.sin(angle)
        matrix = np.eye(4)
        matrix[:2, :2] = [[cos, -sin], [sin, cos]]
        matrix[:3, 3] = self.shift_mm
        return matrix


@dataclass(frozen=True)
class CtPhantomSpec:
    """A chest CT: body, two lungs, optionally nodules and noise.

    ``pixel_spacing_mm`` is (between rows, between columns), so pixels need not be square;
    ``orientation`` is the ImageOrientationPatient of every slice (axial by default; any
    other plane, oblique included, for geometry tests: the slice picture stays the same, the
    nodules are spheres in patient space). Slice ``k`` lies ``k`` x ``slice_thickness_mm``
    along the normal (row direction x column direction) from the plane through the origin,
    centred on it; ``reversed_order`` writes the slices last to first.

    With ``anatomy`` (:class:`~dicom_node.ct_anatomy.ChestAnatomy`) the slices show a chest
    as a scanner does (vessels, airways, ribs, spine, partial volume over the slice thickness,
    the reconstruction kernel) instead of the two ellipses, which stay the default so that
    tests and benchmarks built on them keep their pictures.
    """

    slices: int = 64
    rows: int = 512
    columns: int = 512
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7)
    slice_thickness_mm: float = 1.25
    nodules: tuple[Nodule, ...] = ()
    noise_hu: float = 0.0
    seed: int = 0
    reversed_order: bool = False
    orientation: tuple[float, float, float, float, float, float] = AXIAL
    patient_name: str = "PHANTOM^CT"
    patient_id: str = "PHANTOM-CT"
    study_uid: str | None = None
    series_uid: str | None = None
    anatomy: ChestAnatomy | None = None
    # The patient's pose in the scanner (a follow-up scan's); nodule centres are in the body's
    # coordinates, where they lie with no pose (:meth:`posed` says where the scanner sees them).
    pose: Pose | None = None
    acquired: datetime | None = None  # StudyDate/Time; None: now

    def __post_init__(self) -> None:
        if self.anatomy is not None and self.orientation != AXIAL:
            raise ValueError("a phantom with chest anatomy is drawn on axial slices only")
        if self.pose is not None and (self.anatomy is not None or self.orientation != AXIAL):
            raise ValueError("a posed phantom is the axial one without chest anatomy")

    def posed(self, point: tuple[float, float, float]) -> tuple[float, float, float]:
        """Where the scanner sees a point of the body (LPS mm)."""
        if self.pose is None:
            return point
        x, y, z = (float(v) for v in (self.pose.matrix() @ [*point, 1.0])[:3])
        return x, y, z

    def affine(self) -> np.ndarray:
        """(slice, row, column) indices, slices in acquisition order, -> patient LPS mm."""
        along_row = np.asarray(self.orientation[:3], dtype=float)  # column index grows
        along_column = np.asarray(self.orientation[3:], dtype=float)  # row index grows
        row_mm, column_mm = self.pixel_spacing_mm
        affine = np.eye(4)
        affine[:3, 0] = np.cross(along_row, along_column) * self.slice_thickness_mm
        affine[:3, 1] = along_column * row_mm
        affine[:3, 2] = along_row * column_mm
        affine[:3, 3] = -(affine[:3, 1] * self.rows + affine[:3, 2] * self.columns) / 2
        return affine

    def origin_lps_mm(self, index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``index``."""
        x, y, z = (float(v) for v in (self.affine() @ [index, 0, 0, 1])[:3])
        return x, y, z

    def nodule_mask(self) -> np.ndarray:
        """Truth: voxels inside any nodule, (slice, row, column) in acquisition order."""
        return np.stack(
            [
                np.any([self.nodule_disc(n, k) for n in self.nodules], axis=0)
                if self.nodules
                else np.zeros((self.rows, self.columns), dtype=bool)
                for k in range(self.slices)
            ]
        )

    def nodule_disc(self, nodule: Nodule, index: float) -> np.ndarray:
        """Pixels of slice ``index`` (fractional: a plane between slices) whose centres lie
        inside ``nodule``."""
        r, c = np.ogrid[: self.rows, : self.columns]
        affine = self.affine()
        offset = (
            affine[:3, 3] + affine[:3, 0] * index - np.asarray(self.posed(nodule.center_lps_mm))
        )
        distance = sum(
            (offset[axis] + affine[axis, 1] * r + affine[axis, 2] * c) ** 2 for axis in range(3)
        )
        inside: np.ndarray = distance <= (nodule.diameter_mm / 2) ** 2
        return inside


def _base_dataset(
    sop_class_uid: UID,
    modality: str,
    *,
    patient: tuple[str, str],
    study: tuple[str, str],
    series: tuple[str, str],
    now: datetime,
) -> Dataset:
    """File meta and the patient, study, series and SOP common modules every phantom shares.

    ``patient`` is (name, id); ``study`` and ``series`` are (instance UID, description).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "dicom-node phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID, ds.StudyDescription = study
    ds.SeriesInstanceUID, ds.SeriesDescription = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    return ds


def _axial_slice(spec: CtPhantomSpec) -> np.ndarray:
    """The body and lungs of one slice in HU (turned and moved by the spec's pose)."""
    y: np.ndarray
    x: np.ndarray
    y, x = np.ogrid[: spec.rows, : spec.columns]
    if spec.pose is not None:
        # Each pixel of the scan at the body's pixel it shows: the pose undone, in pixels.
        row_mm, column_mm = spec.pixel_spacing_mm
        origin = spec.affine()[:3, 3]
        scanner_x = origin[0] + x * column_mm + 0 * y
        scanner_y = origin[1] + y * row_mm + 0 * x
        undo = np.linalg.inv(spec.pose.matrix())
        body_x = undo[0, 0] * scanner_x + undo[0, 1] * scanner_y + undo[0, 3]
        body_y = undo[1, 0] * scanner_x + undo[1, 1] * scanner_y + undo[1, 3]
        x, y = (body_x - origin[0]) / column_mm, (body_y - origin[1]) / row_mm
    cy, cx = spec.rows / 2, spec.columns / 2
    hu = np.full((spec.rows, spec.columns), -1000, dtype=np.int16)
    body = ((x - cx) / (0.42 * spec.columns)) ** 2 + ((y - cy) / (0.3 * spec.rows)) ** 2 <= 1
    hu[body] = 40
    for side in (-1, 1):
        lung = ((x - cx - side * 0.2 * spec.columns) / (0.14 * spec.columns)) ** 2 + (
            (y - cy) / (0.22 * spec.rows)
        ) ** 2 <= 1
        hu[lung] = -850
    return hu


def _stored_slices(spec: CtPhantomSpec) -> Iterator[bytes]:
    """Stored values (HU + 1024) of each slice, inferior first."""
    if spec.anatomy is not None:
        yield from _anatomy_slices(spec, spec.anatomy)
        return
    base = _axial_slice(spec)
    if not spec.nodules and not spec.noise_hu:
        stored = (base + 1024).astype(np.uint16).tobytes()
        yield from (stored for _ in range(spec.slices))
        return
    rng = np.random.default_rng(spec.seed)
    for index in range(spec.slices):
        hu = base.astype(np.float32)
        for nodule in spec.nodules:
            hu[spec.nodule_disc(nodule, index)] = nodule.hu
        if spec.noise_hu:
            hu += rng.normal(0.0, spec.noise_hu, hu.shape).astype(np.float32)
        yield np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()


def _anatomy_slices(spec: CtPhantomSpec, anatomy: ChestAnatomy) -> Iterator[bytes]:
    """Stored values of each slice of a phantom with chest anatomy, nodules drawn in it."""
    from dicom_node.ct_anatomy import kernel_noise, slab_hu

    affine = spec.affine()
    row_mm, column_mm = spec.pixel_spacing_mm
    x = affine[0, 3] + np.arange(spec.columns) * column_mm
    y = affine[1, 3] + np.arange(spec.rows) * row_mm
    rng = np.random.default_rng(spec.seed)

    def paint(hu: np.ndarray, z: float) -> None:
        for nodule in spec.nodules:
            hu[spec.nodule_disc(nodule, z / spec.slice_thickness_mm)] = nodule.hu

    for index in range(spec.slices):
        z = float(affine[2, 3] + index * spec.slice_thickness_mm)
        hu = slab_hu(anatomy, x, y, z, spec.slice_thickness_mm, paint)
        if spec.noise_hu:
            hu += kernel_noise(rng, hu.shape, spec.noise_hu, anatomy.kernel)
        yield np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16).tobytes()


def ct_series(spec: CtPhantomSpec = CtPhantomSpec()) -> Iterator[Dataset]:
    """The phantom's instances, one axial slice each, head-first supine.

    Slices go from inferior to superior (or the reverse with ``reversed_order``).
    """
    now = spec.acquired or datetime.now()
    study_uid = spec.study_uid or generate_uid()
    series_uid = spec.series_uid or generate_uid()
    frame_of_reference = generate_uid()
    slices = list(enumerate(_stored_slices(spec)))
    if spec.reversed_order:
        slices.reverse()
    for number, (index, pixels) in enumerate(slices, 1):
        ds = _base_dataset(
            CTImageStorage,
            "CT",
            patient=(spec.patient_name, spec.patient_id),
            study=(study_uid, "PHANTOM CHEST"),
            series=(series_uid, "PHANTOM CHEST AXIAL"),
            now=now,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = spec.slice_thickness_mm
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = list(spec.origin_lps_mm(index))
        ds.ImageOrientationPatient = list(spec.orientation)
        ds.SliceLocation = index * spec.slice_thickness_mm
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = list(spec.pixel_spacing_mm)
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = pixels
        yield ds


def write_ct_series(folder: Path, spec: CtPhantomSpec = CtPhantomSpec()) -> list[Path]:
    """Write the phantom as Part-10 files ``folder/CT0001.dcm`` …; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_series(spec):
        path = folder / f"CT{ds.InstanceNumber:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


CXR_GENERATORS = ("ellipses", "projection")
CXR_VOI = ("window", "tight-window", "lut", "none")


@dataclass(frozen=True)
class CxrPhantomSpec:
    """A PA chest radiograph, clear or with a consolidation-like opacity.

    ``generator`` picks one of two independently drawn phantoms (see
    :mod:`dicom_node.cxr_drawing`): ``ellipses`` (what the demo model is trained on) or
    ``projection`` (built from attenuation along rays; kept out of training, so tests on it
    are off the training distribution). ``seed`` varies anatomy, field of view, collimation,
    markers, tone curve, blur and noise; the opacity sits inside a lung at a seed-dependent
    place.

    How it is stored varies independently: ``bits_stored`` (8-16; 8 is stored in 8-bit
    words), ``photometric`` (MONOCHROME1 stores the inverse), and ``voi``: ``window`` (one
    window over the whole stored range), ``tight-window`` (a window clipping the darkest and
    brightest 1 %), ``lut`` (a sigmoid VOI LUT Sequence, PS3.3 C.11.2) or ``none``.
    """

    rows: int = 512
    columns: int = 512
    opacity: bool = False
    seed: int = 0
    photometric: str = "MONOCHROME2"
    pixel_spacing_mm: float = 0.7
    patient_id: str = "PHANTOM-CXR"
    study_uid: str | None = None
    bits_stored: int = 12
    voi: str = "window"
    generator: str = "ellipses"

    def __post_init__(self) -> None:
        if self.generator not in CXR_GENERATORS:
            raise ValueError(f"generator must be one of {CXR_GENERATORS}, not {self.generator!r}")
        if self.voi not in CXR_VOI:
            raise ValueError(f"voi must be one of {CXR_VOI}, not {self.voi!r}")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"photometric must be MONOCHROME1 or 2, not {self.photometric!r}")
        if not 8 <= self.bits_stored <= 16:
            raise ValueError(f"bits_stored must be 8-16, not {self.bits_stored}")


def cxr_pixels(spec: CxrPhantomSpec) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Stored values and the opacity centre (row, column), or None for a clear phantom.

    The values use ``spec.bits_stored`` bits (uint8 for 8, else uint16); MONOCHROME1 stores
    ``2**bits - 1`` minus the MONOCHROME2 value, so both display the same picture.
    """
    from dicom_node.cxr_drawing import draw_ellipses, draw_projection

    draw = draw_ellipses if spec.generator == "ellipses" else draw_projection
    brightness, centre = draw(
        np.random.default_rng(spec.seed), spec.rows, spec.columns, spec.opacity
    )
    top = 2**spec.bits_stored - 1
    stored = np.round(brightness * top)
    if spec.photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint8 if spec.bits_stored == 8 else np.uint16), centre


def _cxr_voi(ds: Dataset, pixels: np.ndarray, spec: CxrPhantomSpec) -> None:
    """The VOI LUT module (PS3.3 C.11.2) the spec asks for."""
    top = 2**spec.bits_stored
    if spec.voi == "window":
        ds.WindowCenter, ds.WindowWidth = top // 2, top
        return
    if spec.voi == "none":
        return
    low, high = (int(v) for v in np.percentile(pixels, [1, 99]))
    high = max(high, low + 2)
    if spec.voi == "tight-window":
        ds.WindowCenter, ds.WindowWidth = (low + high) / 2, high - low
        return
    # A sigmoid LUT over [low, high], 16-bit output; values outside map to its end entries.
    entries = min(high - low + 1, 65535)
    curve = 1 / (1 + np.exp(-8 * (np.linspace(0, 1, entries) - 0.5)))
    curve = (curve - curve[0]) / (curve[-1] - curve[0])
    item = Dataset()
    item.LUTDescriptor = [entries, low, 16]  # PS3.3 C.11.2.1.1: 8 or 16 bits an entry
    item.LUTExplanation = "PHANTOM SIGMOID"
    # OW, not a list of US: a 16-bit image's LUT has tens of thousands of entries.
    item.add_new(0x00283006, "OW", np.round(curve * 65535).astype("<u2").tobytes())
    ds.VOILUTSequence = [item]


def cxr_dataset(spec: CxrPhantomSpec = CxrPhantomSpec()) -> Dataset:
    """The phantom as a CR Image Storage instance (PS3.3 A.2), Explicit VR Little Endian."""
    pixels, _ = cxr_pixels(spec)
    ds = _base_dataset(
        ComputedRadiographyImageStorage,
        "CR",
        patient=("PHANTOM^CXR", spec.patient_id),
        study=(spec.study_uid or generate_uid(), "PHANTOM CHEST PA"),
        series=(generate_uid(), "PHANTOM CHEST PA"),
        now=datetime.now(),
    )
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 * pixels.itemsize
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    _cxr_voi(ds, pixels, spec)
    ds.PixelData = pixels.tobytes()
    return ds


BRAIN_ROLES = ("T1c", "T1", "T2", "FLAIR")
# Signal of each tissue per sequence (arbitrary units): background, scalp, brain, CSF,
# necrotic core, enhancing rim, oedema. The contrasts follow what each sequence shows a reader.
_BRAIN_SIGNAL = {
    "T1c": (0, 900, 600, 200, 300, 1300, 500),
    "T1": (0, 900, 600, 200, 300, 520, 480),
    "T2": (0, 600, 500, 1500, 1400, 900, 1200),
    "FLAIR": (0, 600, 500, 150, 800, 950, 1350),
}
_TIMING_MS = {"T1c": (2000, 3), "T1": (500, 10), "T2": (4000, 100), "FLAIR": (9000, 120)}
# What the scanner records of each sequence (PS3.3 C.8.3.1), as routing reads it: an MPRAGE
# after gadolinium, a spin-echo T1, a turbo spin-echo T2 and an inversion-recovery FLAIR.
# Values: ScanningSequence, SequenceVariant, MRAcquisitionType, InversionTime, EchoTrainLength.
_ACQUISITION = {
    "T1c": (["GR", "IR"], ["SK", "SP", "MP"], "3D", 900, 1),
    "T1": ("SE", "NONE", "2D", None, 1),
    "T2": ("SE", ["SK", "SP"], "2D", None, 16),
    "FLAIR": (["SE", "IR"], ["SK", "SP", "MP"], "2D", 2500, 16),
}
_SERIES_DESCRIPTION = {
    "T1c": "AX T1 MPRAGE POST GD",
    "T1": "AX T1 SE",
    "T2": "AX T2 TSE",
    "FLAIR": "AX T2 FLAIR",
}


@dataclass(frozen=True)
class BrainPhantomSpec:
    """A four-sequence brain MR study (T1c, T1, T2, FLAIR) with a ring-enhancing tumour.

    All sequences share one axial grid of ``frames`` x ``rows`` x ``columns`` voxels;
    ``spacing_mm`` is (between slices, between rows, between columns), so pixels need not be
    square. ``reversed_order`` writes the slices from head to feet instead.
    """

    frames: int = 32
    rows: int = 64
    columns: int = 64
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    tumour: bool = True
    seed: int = 0
    reversed_order: bool = False
    patient_id: str = "PHANTOM-MR"


@dataclass(frozen=True)
class BrainPhantom:
    """The sequences as data sets, and the truth: masks in the (frame, row, column) grid.

    Frames of the truth grid run from feet to head whatever order the instances were written
    in; ``affine`` maps (frame, row, column) indices of that grid to patient LPS mm.
    """

    series: dict[str, list[Dataset]]
    tumour_core: np.ndarray
    whole_tumour: np.ndarray
    enhancing_tumour: np.ndarray
    affine: np.ndarray


def _brain_labels(spec: BrainPhantomSpec, rng: np.random.Generator) -> np.ndarray:
    """Tissue index per voxel (0-6, the order of ``_BRAIN_SIGNAL``), grid (frame, row, col)."""
    z, y, x = np.mgrid[: spec.frames, : spec.rows, : spec.columns].astype(float)
    z, y, x = _brain_position(spec, z, y, x)
    head = (x / 80) ** 2 + (y / 95) ** 2 + (z / 70) ** 2
    labels = np.zeros(head.shape, dtype=np.uint8)
    labels[head <= 1] = 1  # scalp and skull
    labels[head <= 0.8] = 2  # brain
    ventricles = ((np.abs(x) - 9) / 6) ** 2 + (y / 25) ** 2 + (z / 18) ** 2 <= 1
    labels[ventricles] = 3
    if spec.tumour:
        centre = np.array(
            [rng.uniform(-25, 25), rng.uniform(-35, 35), rng.uniform(-15, 15)]
        )  # x, y, z in mm, inside the brain and off the ventricles
        centre[0] = np.sign(centre[0] or 1) * max(abs(centre[0]), 28)
        core = rng.uniform(6, 10)
        rim = core + rng.uniform(5, 7)
        oedema = rim + rng.uniform(7, 12)
        distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
        inside = labels >= 2
        labels[inside & (distance <= oedema)] = 6
        labels[inside & (distance <= rim)] = 5
        labels[inside & (distance <= core)] = 4
    return labels


def _brain_position(
    spec: BrainPhantomSpec, frame: np.ndarray, row: np.ndarray, column: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient (z, y, x) in mm of voxel indices: the head centred on the grid's centre."""
    dz, dy, dx = spec.spacing_mm
    return (
        (frame - spec.frames / 2) * dz,
        (row - spec.rows / 2) * dy,
        (column - spec.columns / 2) * dx,
    )


def brain_study(spec: BrainPhantomSpec = BrainPhantomSpec()) -> BrainPhantom:
    """The study as MR Image Storage series (PS3.3 A.4), one per role, and its truth."""
    rng = np.random.default_rng(spec.seed)
    labels = _brain_labels(spec, rng)
    study_uid, frame_of_reference, now = generate_uid(), generate_uid(), datetime.now()
    series: dict[str, list[Dataset]] = {}
    for number, role in enumerate(BRAIN_ROLES, 1):
        signal = np.asarray(_BRAIN_SIGNAL[role], float) * rng.uniform(0.9, 1.1)
        volume = signal[labels] + rng.normal(0, 15, labels.shape)
        stored = np.clip(volume, 0, 4095).astype(np.uint16)
        series_uid = generate_uid()
        datasets = []
        order = range(spec.frames - 1, -1, -1) if spec.reversed_order else range(spec.frames)
        for instance, index in enumerate(order, 1):
            ds = _base_dataset(
                MRImageStorage,
                "MR",
                patient=("PHANTOM^MR", spec.patient_id),
                study=(study_uid, "PHANTOM BRAIN TUMOUR"),
                series=(series_uid, _SERIES_DESCRIPTION[role]),
                now=now,
            )
            ds.SeriesNumber = number
            ds.InstanceNumber = instance
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
            ds.BodyPartExamined = "BRAIN"
            scanning, variant, acquisition, inversion, echo_train = _ACQUISITION[role]
            ds.ScanningSequence, ds.SequenceVariant = scanning, variant
            ds.ScanOptions = "IR" if inversion else ""
            ds.MRAcquisitionType = acquisition
            ds.EchoTrainLength = echo_train
            ds.RepetitionTime, ds.EchoTime = _TIMING_MS[role]
            if inversion:
                ds.InversionTime = inversion
            if role == "T1c":
                ds.ContrastBolusAgent = "Gadobutrol"
            ds.SliceThickness = spec.spacing_mm[0]
            ds.PatientPosition = "HFS"
            ds.FrameOfReferenceUID = frame_of_reference
            ds.PositionReferenceIndicator = ""
            z, y, x = _brain_position(spec, np.float64(index), np.float64(0), np.float64(0))
            ds.ImagePositionPatient = [float(x), float(y), float(z)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [spec.spacing_mm[1], spec.spacing_mm[2]]  # rows, then columns
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = spec.rows, spec.columns
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.PixelData = stored[index].tobytes()
            datasets.append(ds)
        series[role] = datasets
    return BrainPhantom(
        series,
        tumour_core=np.isin(labels, (4, 5)),
        whole_tumour=np.isin(labels, (4, 5, 6)),
        enhancing_tumour=labels == 5,
        affine=_brain_affine(spec),
    )


def _brain_affine(spec: BrainPhantomSpec) -> np.ndarray:
    """(frame, row, column) -> patient (x, y, z) mm; rows run along y, columns along x."""
    dz, dy, dx = spec.spacing_mm
    origin = [float(v) for v in _brain_position(spec, *(np.float64(0),) * 3)]
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0, 0, dz)
    affine[:3, 1] = (0, dy, 0)
    affine[:3, 2] = (dx, 0, 0)
    affine[:3, 3] = (origin[2], origin[1], origin[0])
    affine[3, 3] = 1
    return affine


def write_brain_study(folder: Path, spec: BrainPhantomSpec = BrainPhantomSpec()) -> BrainPhantom:
    """Write the study as ``folder/<role>/MR0001.dcm`` …; returns the phantom."""
    phantom = brain_study(spec)
    for role, datasets in phantom.series.items():
        (folder / role).mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            ds.save_as(folder / role / f"MR{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
    return phantom
