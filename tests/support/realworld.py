"""A real-world corpus for the node (issue 14): public DICOM installed with the test
dependencies, referred to where it lies, plus generated reproductions of each class of
failure the issue found on real scanner and PACS data.

Public sources (never copied into the repository; found by package, read in place):

- ``pydicom-data`` (package ``data_store``): pydicom's large test files — CT/MR/CR/US/NM from
  real scanners in every transfer syntax, SEG, Secondary Capture in odd encodings.
- ``pydicom`` (``pydicom/data``): its small test files, character set files and colour
  palettes, DICOMDIR and deliberately malformed files among them.
- ``pynetdicom`` (``pynetdicom/tests/dicom_files``): the files its own network tests send.
- ``nibabel`` (``nibabel/nicom/tests/data``): Siemens MR (mosaic DTI, CSA headers).

Only Part-10 files (a "DICM" prefix after the preamble) are taken: a sender of files sends
those. Files with the same bytes (nibabel ships two copies) are taken once.

The reproductions are small, built by code and deterministic (UIDs from fixed entropy, fixed
dates): each is a case of issue 14 named by its item, with what the node must do with it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.phantoms import (
    BRAIN_ROLES,
    BrainPhantomSpec,
    CtPhantomSpec,
    CxrPhantomSpec,
    brain_study,
    ct_series,
    cxr_dataset,
)
from dicom_node.store import encode_file_meta
from tests.support.encoding import deep_sequence, encoded, put

# -- what must become of a file ---------------------------------------------------------------


@dataclass(frozen=True)
class Either:
    """A public file: acknowledged and processed, or refused with its status and a reason, or
    (a SOP class the node does not list in its conformance statement) its presentation context
    rejected at negotiation."""


@dataclass(frozen=True)
class Kept:
    """Acknowledged and processed. ``routed``: the algorithms its series (or study) must be
    routed to, exactly; ``role``: the role the series must fill in that job (None: it must be
    no input of any job); ``not_routed``: words the series' decision must give instead."""

    routed: tuple[str, ...] | None = None
    role: str | None = None
    not_routed: str | None = None


@dataclass(frozen=True)
class Refused:
    """Refused at C-STORE with ``status`` (PS3.4 B.2.3) and ``reason`` in the node's log."""

    status: int
    reason: str = ""


@dataclass(frozen=True)
class NotStored:
    """Not stored: refused with a failure status and a reason, or skipped by the sender with a
    reason in words; the sender goes on with the next file."""


Expect = Either | Kept | Refused | NotStored


@dataclass(frozen=True)
class CorpusFile:
    """One file to send: ``name`` identifies it in test IDs and tables; files of one
    ``group`` go over one association (a series, or a case sent as a PACS would forward it)."""

    path: Path
    name: str
    group: str
    expect: Expect = Either()
    xfail: str | None = None  # a known open bug (for every sender): "issue 14 item N: ..."
    check: Callable[..., None] | None = field(default=None, compare=False)


# -- public files -----------------------------------------------------------------------------

PUBLIC_SOURCES = (
    ("pydicom-data", "data_store", "data"),
    ("pydicom", "pydicom", "data"),
    ("pynetdicom", "pynetdicom", "tests/dicom_files"),
    ("nibabel", "nibabel", "nicom/tests/data"),
)

RETIRED_US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6"


def package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_part10(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def public_files() -> list[CorpusFile]:
    """Every Part-10 file of the installed public sources, in a stable order."""
    found: list[CorpusFile] = []
    seen: set[str] = set()
    for label, package, folder in PUBLIC_SOURCES:
        root = package_folder(package)
        if root is None or not (root / folder).is_dir():
            continue
        for path in sorted(p for p in (root / folder).rglob("*") if p.is_file()):
            if path.suffix in (".py", ".pyc") or path.stat().st_size < 132 or not is_part10(path):
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            name = f"{label}/{path.relative_to(root / folder)}"
            known = _known(path)
            if name in OPEN_BUGS:
                known["xfail"] = OPEN_BUGS[name]
            found.append(CorpusFile(path, name, group=name, **known))
    return found


# Public files that meet a bug outside the items above, to go when it is fixed.
OPEN_BUGS: dict[str, str] = {}


def _known(path: Path) -> dict:
    """What issue 14 says must become of particular public files, where the node is not there
    yet."""
    from pydicom import dcmread

    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # a malformed public file: the generic rule applies
        return {}
    if header.get("SOPClassUID") == RETIRED_US_IMAGE_STORAGE:  # old archives send it (item 6)
        return {"expect": Kept()}
    return {}


# -- generated reproductions ------------------------------------------------------------------

# Patient data of every generated file: none of it may reach the node's log above DEBUG.
PATIENT_NAME = "Realworld^Hildegard"
PATIENT_ID = "RW14-70213"
BIRTH_DATE = "19470523"
STUDY_DATE = "20240611"

LUNG, BRAIN, CXR = "lung-nodules-ct", "brain-tumour-mr", "pneumonia-cxr"

PRIVATE_CLASSES = {
    "1.3.12.2.1107.5.9.1": ("SIEMENS CSA NON-IMAGE", "MR", "PhoenixZIPReport"),
    "1.2.840.113619.4.26": ("GEMS_IDEN_01", "CT", "GE 3D model"),
    "1.2.840.113619.4.30": ("GEMS_GENIE_1", "NM", "eNTEGRA protocol"),
    "1.3.46.670589.11.0.0.12.1": ("Philips MR Imaging DD 001", "MR", "Spectrum"),
    "1.3.46.670589.11.0.0.12.2": ("Philips MR Imaging DD 001", "MR", "Series data"),
}


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["dicom-node issue 14 corpus", *map(str, parts)])


def _as_patient(ds: Dataset, case: str, series: str, index: int) -> Dataset:
    """Deterministic identity: UIDs from the case, fixed dates, the corpus's patient."""
    study = _uid(case, "study")
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = _uid(case, series)
    ds.SOPInstanceUID = _uid(case, series, index)
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = _uid(case, "frame of reference")
    for keyword in ("StudyDate", "SeriesDate", "ContentDate"):
        if keyword in ds:
            setattr(ds, keyword, STUDY_DATE)
    for keyword in ("StudyTime", "SeriesTime", "ContentTime"):
        if keyword in ds:
            setattr(ds, keyword, "101500")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


class _Writer:
    """Writes a case's files under one folder and names them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[CorpusFile] = []

    def add(
        self,
        case: str,
        datasets: Iterable[Dataset],
        expect: Expect,
        check: Callable[..., None] | None = None,
        group: str | None = None,
    ) -> None:
        (self.folder / case).mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            path = self.folder / case / f"{len(self.files):03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.add_path(case, path, expect, check, group)

    def add_bytes(self, case: str, ds: Dataset, data: bytes, expect: Expect) -> None:
        (self.folder / case).mkdir(parents=True, exist_ok=True)
        path = self.folder / case / f"{len(self.files):03d}.dcm"
        meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "RW14")
        path.write_bytes(meta + data)
        self.add_path(case, path, expect, None, None)

    def add_path(self, case, path, expect, check, group) -> None:
        name = f"issue14/{case}/{path.name}"
        self.files.append(CorpusFile(path, name, group or case, expect, check=check))


def _ct(case: str, slices: int, size: int = 64) -> list[Dataset]:
    spec = CtPhantomSpec(slices=slices, rows=size, columns=size)
    return [_as_patient(ds, case, "ct", i) for i, ds in enumerate(ct_series(spec))]


def _cxr(case: str) -> Dataset:
    ds = cxr_dataset(CxrPhantomSpec(rows=256, columns=256))
    return _as_patient(ds, case, "cr", 0)


def private_objects(case: str) -> list[Dataset]:
    """One object of each vendor-private storage class the conformance statement lists, as a
    PACS forwards them: patient and study modules, the vendor's private block, no pixels."""
    objects = []
    for index, (sop_class, (creator, modality, description)) in enumerate(PRIVATE_CLASSES.items()):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.Modality = modality
        ds.Manufacturer = creator.split()[0]
        ds.SeriesDescription = description
        ds.SeriesNumber = 99
        ds.InstanceNumber = 1
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.PatientSex = "F"
        ds.StudyDate = ds.ContentDate = STUDY_DATE
        ds.StudyTime = ds.ContentTime = "101500"
        block = ds.private_block(0x0029, creator, create=True)
        block.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01" + bytes(56))  # a CSA-like header
        objects.append(_as_patient(ds, case, f"private {index}", 0))
    return objects


def mr_study(case: str) -> dict[str, list[Dataset]]:
    """A four-sequence brain MR study as real scanners name it, plus the two series issue 14
    saw chosen wrongly: a gradient-echo EPI named "T2W/FE-EPI", and "FLAIR_ROI", a lesion mask
    stored as an ORIGINAL/PRIMARY MR series with a higher series number than the FLAIR."""
    phantom = brain_study(BrainPhantomSpec(frames=16, rows=32, columns=32))
    series = phantom.series
    series["T2"] = [_described(ds, "sT2/TSE/T", 3) for ds in series["T2"]]
    for ds in series["T1c"]:
        ds.ContrastBolusAgent = "Gadobutrol"
    for ds in series["FLAIR"]:
        ds.ScanningSequence, ds.SequenceVariant, ds.InversionTime = "IR", "SK", 2500
    epi = [_described(copy.deepcopy(ds), "T2W/FE-EPI", 5) for ds in series["T2"]]
    for ds in epi:
        ds.ScanningSequence, ds.SequenceVariant = "EP", "SK"
        ds.RepetitionTime, ds.EchoTime = 3000, 30
        ds.EchoTrainLength = 64
    roi = [_described(copy.deepcopy(ds), "FLAIR_ROI", 12) for ds in series["FLAIR"]]
    for ds, mask in zip(roi, phantom.whole_tumour, strict=True):
        ds.PixelData = mask.astype(np.uint16).tobytes()
    series["EPI"], series["ROI"] = epi, roi
    return {
        role: [_as_patient(ds, case, role, i) for i, ds in enumerate(datasets)]
        for role, datasets in series.items()
    }


def _described(ds: Dataset, description: str, number: int) -> Dataset:
    ds.SeriesDescription = ds.ProtocolName = description
    ds.SeriesNumber = number
    return ds


def reproductions(folder: Path) -> list[CorpusFile]:
    """Write one case per class of issue 14 under ``folder``; what each must become."""
    w = _Writer(folder)

    # Item 1: each private class, then ordinary images, on one association.
    case = "private-storage-classes"
    w.add(case, [*private_objects(case), *_ct(case, 2)], Kept(routed=()))

    # Item 2: Type 2 patient/study attributes missing, as in many real radiographs.
    case = "cr-missing-type-2"
    ds = _cxr(case)
    for keyword in (
        "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
        "StudyDate", "StudyTime", "ReferringPhysicianName",
    ):  # fmt: skip
        delattr(ds, keyword)
    w.add(case, [ds], Kept(routed=(CXR,)))

    case = "cr-no-body-part"
    ds = _cxr(case)
    del ds.BodyPartExamined, ds.PatientOrientation
    w.add(case, [ds], Kept(routed=(CXR,)), check=no_invented_orientation)

    case = "ct-referenced-study-without-class"
    datasets = _ct(case, 20)
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPInstanceUID = _uid(case, "referenced study")
        ds.ReferencedStudySequence = Sequence([item])
    w.add(case, datasets, Kept(routed=(LUNG,)))

    # Item 3: roles on real series names.
    case = "mr-epi-and-flair-roi"
    for role, datasets in mr_study(case).items():
        # The EPI and the mask are passed over: no job takes them.
        expect = Kept(routed=(BRAIN,), role=role) if role in BRAIN_ROLES else Kept(routed=())
        w.add(case, datasets, expect, group=case)

    # Item 6: nested too deep for pydicom, after the header a router reads.
    case = "nested-too-deep"
    (ds,) = _ct(case, 1)
    data = put(encoded(ds), 0x00400275, deep_sequence(0x00400275, 5000))
    w.add_bytes(case, ds, data, Refused(0xC000))

    case = "cr-without-pixel-data"
    ds = _cxr(case)
    del ds.PixelData
    w.add(case, [ds], Kept(routed=(), not_routed="pixel data"))

    case = "retired-us-image"
    ds = _cxr(case)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RETIRED_US_IMAGE_STORAGE
    ds.Modality = "US"
    del ds.ImagerPixelSpacing, ds.ViewPosition
    w.add(case, [ds], Kept(routed=()))

    case = "no-sop-uids"
    (ds,) = _ct(case, 1)
    del ds.SOPClassUID, ds.SOPInstanceUID  # the file meta still names them
    w.add(case, [ds], NotStored())
    return w.files


def no_invented_orientation(outputs: dict[str, Path]) -> None:
    """The source has no PatientOrientation: the SC must not claim one (issue 14 item 2)."""
    from pydicom import dcmread

    if "SC" in outputs:
        orientation = dcmread(outputs["SC"], stop_before_pixels=True).get("PatientOrientation")
        assert not orientation, f"the SC invents PatientOrientation {orientation}"


def patient_values(paths: Iterable[Path]) -> set[str]:
    """PatientName, PatientID and PatientBirthDate of the files, as they would appear in text:
    what the node's log must not hold above DEBUG. Values too short to be told from other
    text (a one-digit ID) are left out."""
    from pydicom import dcmread

    values: set[str] = set()
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
            for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
                value = str(ds.get(keyword, "") or "").strip()
                for part in {value, *value.split("^")}:
                    if len(part.strip("^ ")) >= 5:
                        values.add(part.strip("^ "))
        except Exception:  # a file pydicom cannot read names nobody
            continue
    return values
