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

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.store import IMPLEMENTATION_CLASS_UID


@dataclass(frozen=True)
class CtPhantomSpec:
    slices: int = 64
    rows: int = 512
    columns: int = 512
    pixel_spacing_mm: float = 0.7
    slice_thickness_mm: float = 1.25
    patient_name: str = "PHANTOM^CT"
    patient_id: str = "PHANTOM-CT"
    study_uid: str | None = None
    series_uid: str | None = None


def _axial_slice(spec: CtPhantomSpec) -> np.ndarray:
    """One slice in stored values (HU + 1024, rescale intercept -1024)."""
    y, x = np.ogrid[: spec.rows, : spec.columns]
    cy, cx = spec.rows / 2, spec.columns / 2
    hu = np.full((spec.rows, spec.columns), -1000, dtype=np.int16)
    body = ((x - cx) / (0.42 * spec.columns)) ** 2 + ((y - cy) / (0.3 * spec.rows)) ** 2 <= 1
    hu[body] = 40
    for side in (-1, 1):
        lung = ((x - cx - side * 0.2 * spec.columns) / (0.14 * spec.columns)) ** 2 + (
            (y - cy) / (0.22 * spec.rows)
        ) ** 2 <= 1
        hu[lung] = -850
    return (hu + 1024).astype(np.uint16)


def ct_series(spec: CtPhantomSpec = CtPhantomSpec()) -> Iterator[Dataset]:
    """The phantom's instances, one axial slice each, head-first supine, inferior to superior."""
    now = datetime.now()
    study_uid = spec.study_uid or generate_uid()
    series_uid = spec.series_uid or generate_uid()
    frame_of_reference = generate_uid()
    pixels = _axial_slice(spec).tobytes()
    for index in range(spec.slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-node phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "PHANTOM CHEST"
        ds.SeriesDescription = "PHANTOM CHEST AXIAL"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = spec.slice_thickness_mm
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [
            -spec.columns * spec.pixel_spacing_mm / 2,
            -spec.rows * spec.pixel_spacing_mm / 2,
            index * spec.slice_thickness_mm,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = index * spec.slice_thickness_mm
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
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


@dataclass(frozen=True)
class CxrPhantomSpec:
    """A PA chest radiograph: body, two lungs, a spine shadow, and optionally an opacity.

    ``seed`` varies anatomy, exposure and noise, so a training set can be drawn from it; the
    opacity (a consolidation-like blob) sits inside a lung at a seed-dependent place.
    """

    rows: int = 512
    columns: int = 512
    opacity: bool = False
    seed: int = 0
    photometric: str = "MONOCHROME2"
    pixel_spacing_mm: float = 0.7
    patient_id: str = "PHANTOM-CXR"
    study_uid: str | None = None


def cxr_pixels(spec: CxrPhantomSpec) -> tuple[np.ndarray, tuple[float, float] | None]:
    """12-bit stored values (MONOCHROME2 sense: air dark) and the opacity centre (row, col)."""
    rng = np.random.default_rng(spec.seed)
    y, x = np.mgrid[: spec.rows, : spec.columns].astype(float)
    y /= spec.rows
    x /= spec.columns
    image = np.full((spec.rows, spec.columns), 300.0)  # air around the patient
    body = ((x - 0.5) / 0.44) ** 2 + ((y - 0.55) / 0.5) ** 2 <= 1
    image[body] = 2600 + rng.normal(0, 80)
    lungs = []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        cy = rng.uniform(0.45, 0.5)
        rx, ry = rng.uniform(0.12, 0.15), rng.uniform(0.26, 0.31)
        lung = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        image[lung] = 900 + rng.normal(0, 60)
        lungs.append((cx, cy, rx, ry))
    spine = body & (np.abs(x - 0.5) < 0.04)
    image[spine] = 3000
    center = None
    if spec.opacity:
        cx, cy, rx, ry = lungs[rng.integers(2)]
        oy = cy + rng.uniform(-0.4, 0.5) * ry
        ox = cx + rng.uniform(-0.4, 0.4) * rx
        radius = rng.uniform(0.05, 0.09)
        blob = np.exp(-(((x - ox) ** 2 + (y - oy) ** 2) / (2 * radius**2)))
        image += blob * rng.uniform(900, 1400) * (image < 1500)
        center = (oy * spec.rows, ox * spec.columns)
    image += rng.normal(0, 40, image.shape)
    stored = np.clip(image, 0, 4095)
    if spec.photometric == "MONOCHROME1":
        stored = 4095 - stored
    return stored.astype(np.uint16), center


def cxr_dataset(spec: CxrPhantomSpec = CxrPhantomSpec()) -> Dataset:
    """The phantom as a CR Image Storage instance (PS3.3 A.2), Explicit VR Little Endian."""
    pixels, _ = cxr_pixels(spec)
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.Manufacturer = "dicom-node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM CHEST PA"
    ds.SeriesDescription = "PHANTOM CHEST PA"
    ds.PatientName = "PHANTOM^CXR"
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.StudyInstanceUID = spec.study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.tobytes()
    return ds
