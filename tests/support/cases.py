"""Phantom inputs and results with known answers, shared by the writers' tests, the detectors'
tests and the tests that send them through a node: CT in any plane with a nodule where the
masks say, the lung detector's phantoms, MR headers for routing, a brain study with decoys."""

from __future__ import annotations

import math
import random
from copy import deepcopy
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.algorithm import (
    AlgorithmResult,
    Classification,
    Concept,
    Finding,
    HeatMap,
    LabelMask,
    SeriesInput,
    Weights,
)
from dicom_node.phantoms import (
    AXIAL,
    BrainPhantomSpec,
    CtPhantomSpec,
    Nodule,
    brain_study,
    ct_series,
    write_ct_series,
)
from dicom_node.write import Provenance, heat_map_capture

# -- CT in any plane, for the writers (SEG, SR) ------------------------------------------------

NODULE = Concept("SCT", "27925004", "Nodule")
LUNG = Concept("SCT", "39607008", "Lung")
BODY = Concept("SCT", "38266002", "Entire body")


def oblique(a: float, b: float) -> tuple[float, ...]:
    """Axial rotated by ``a`` about z, then tilted by ``b`` about the new row direction."""
    row = np.array([math.cos(a), math.sin(a), 0.0])
    column = np.array([-math.sin(a), math.cos(a), 0.0])
    column = column * math.cos(b) + np.cross(row, column) * math.sin(b)
    return tuple(round(float(v), 6) for v in (*row, *column))


PLANES = {
    "axial": AXIAL,
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": oblique(math.radians(20), math.radians(25)),
}


def phantom(
    plane: str, reversed_order: bool, pixel_spacing_mm: tuple[float, float] = (0.9, 0.6)
) -> CtPhantomSpec:
    """A small CT (non-square pixels unless told) in ``plane`` with a nodule in the middle."""
    spec = CtPhantomSpec(
        slices=24,
        rows=48,
        columns=40,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_thickness_mm=1.5,
        orientation=PLANES[plane],
        reversed_order=reversed_order,
    )
    center = spec.affine() @ [spec.slices / 2 + 0.3, spec.rows / 2 - 3.2, spec.columns / 2 + 2.6, 1]
    return CtPhantomSpec(**{**spec.__dict__, "nodules": (Nodule(tuple(center[:3]), 9.0),)})


def masks_for(spec: CtPhantomSpec, volume: hd.Volume) -> list[LabelMask]:
    """Two overlapping segments on the volume's grid: the nodule (truth) and the body."""
    nodule = hd.Volume(
        spec.nodule_mask().astype(np.uint8), spec.affine(), "PATIENT", volume.frame_of_reference_uid
    ).match_geometry(volume)
    return [
        LabelMask("Nodule 1", nodule.array.astype(bool), property_type=NODULE, anatomy=LUNG),
        LabelMask(
            "Body",
            volume.array > -500,
            property_type=BODY,
            category=Concept("SCT", "91723000", "Anatomical structure"),
        ),
    ]


PROVENANCE = Provenance("test-geometry", "1.0", Weights(None, "ab" * 32, demo=True))


def ct_case(
    tmp_path: Path,
    plane: str,
    *,
    with_nodule: bool = True,
    pixel_spacing_mm: tuple[float, float] = (0.9, 0.6),
):
    spec = phantom(plane, reversed_order=True, pixel_spacing_mm=pixel_spacing_mm)
    paths = write_ct_series(tmp_path / "ct", spec)
    shuffled = list(paths)
    random.Random(2).shuffle(shuffled)
    series = SeriesInput("1", tuple(shuffled))
    masks = masks_for(spec, series.volume())
    (nodule,) = spec.nodules
    findings = [
        Finding(
            "Nodule",
            nodule.center_lps_mm,
            (9.0, 9.0, 9.0),
            0.93,
            mask="Nodule 1",
            finding_type=NODULE,
            site=LUNG,
        )
    ]
    result = AlgorithmResult(
        "test-geometry",
        "1.0",
        demo=True,
        masks=masks if with_nodule else masks[1:],
        findings=findings if with_nodule else [],
        looked_for=[NODULE],
    )
    return spec, paths, series, result


# -- a radiograph's heat map, for the SC writer ------------------------------------------------


def capture_of(path: Path, probability: float, demo: bool = True):
    ds = dcmread(path)
    rows, columns = ds.Rows, ds.Columns
    yy, xx = np.mgrid[:rows, :columns]
    peak = (int(rows * 0.6), int(columns * 0.3))
    heat = np.exp(-(((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2) / (2 * (rows * 0.08) ** 2)))
    result = AlgorithmResult(
        "pneumonia-cxr",
        "1.0.0",
        demo=demo,
        classifications=[Classification("Pneumonia", probability, 0.57)],
        heatmaps=[HeatMap("Pneumonia Grad-CAM", heat)],
    )
    provenance = Provenance("pneumonia-cxr", "1.0.0", Weights(None, None, demo))
    inputs = {"series": SeriesInput("1", (path,))}
    return heat_map_capture(result, inputs, provenance, series_number=903), peak


# -- the lung nodule detector's phantoms ------------------------------------------------------

PHANTOMS = {
    "axial": CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.75, 0.75), noise_hu=20,
        nodules=(Nodule((-27.0, 4.0, 24.0), 9.0),),
    ),
    "reversed": CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.7, 0.7), noise_hu=15,
        nodules=(Nodule((22.0, -8.0, 30.0), 7.0),), reversed_order=True,
    ),
    "non-square": CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.85, 0.68), noise_hu=25,
        nodules=(Nodule((-18.0, 10.0, 20.0), 10.0), Nodule((20.0, -5.0, 32.0), 8.0)),
    ),
}  # fmt: skip


# -- MR for routing: headers, and a brain study with decoys ------------------------------------


def mr_series(study_uid: str, description: str, number: int, *, slices: int = 4) -> list:
    """Headers of an MR series (routing reads headers only)."""
    datasets = []
    for ds in ct_series(CtPhantomSpec(slices=slices, rows=8, columns=8, study_uid=study_uid)):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.SeriesDescription = description
        ds.SeriesNumber = number
        ds.BodyPartExamined = "BRAIN"
        datasets.append(ds)
    return datasets


def decoy_study(folder: Path, spec: BrainPhantomSpec | None = None) -> dict:
    """A brain tumour study as a hospital sends it: the four sequences under real names, and
    series that look like them to a description pattern: a gradient-echo EPI called T2, a
    FLAIR lesion mask stored as an MR image (ORIGINAL/PRIMARY, binary pixels, a later series
    number), a DWI and a localizer. Written as folder/<name>/MR*.dcm; returns name -> UID."""
    spec = spec or BrainPhantomSpec(frames=8)
    phantom = brain_study(spec)
    names = {"T1c": "T1W_3D_TFE +C", "T1": "T1W_SE", "T2": "sT2/TSE/T", "FLAIR": "T2W_FLAIR"}
    series = {names[role]: datasets for role, datasets in phantom.series.items()}

    def decoy(source: str, name: str, number: int, **changes) -> None:
        uid = generate_uid()
        copies = []
        for ds in phantom.series[source]:
            copy = deepcopy(ds)
            copy.SeriesInstanceUID, copy.SeriesDescription, copy.SeriesNumber = uid, name, number
            copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            for keyword, value in changes.items():
                if value is None:
                    delattr(copy, keyword)
                else:
                    setattr(copy, keyword, value)
            copies.append(copy)
        series[name] = copies

    decoy("T2", "T2W/FE-EPI", 7, ScanningSequence=["GR", "EP"], SequenceVariant="SK",
          RepetitionTime=3000, EchoTime=35)  # fmt: skip
    mask = np.zeros((spec.rows, spec.columns), np.uint16)
    mask[20:30, 20:30] = 1
    decoy("FLAIR", "FLAIR_ROI", 9, PixelData=mask.tobytes())
    decoy("T2", "Ax DWI 1000b", 5, ScanningSequence=["EP", "SE"], SequenceVariant="NONE",
          RepetitionTime=6000, EchoTime=72, DiffusionBValue=1000)  # fmt: skip
    decoy("T1", "3-Plane Loc", 6, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
          ScanningSequence="GR", RepetitionTime=5.2, EchoTime=1.5)  # fmt: skip
    for name, datasets in series.items():
        where = folder / name.replace("/", "_").replace(" ", "_")
        where.mkdir(parents=True)
        for ds in datasets:
            ds.SeriesDescription = name
            ds.save_as(where / f"MR{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
    return {name: str(datasets[0].SeriesInstanceUID) for name, datasets in series.items()}
