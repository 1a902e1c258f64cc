"""What routing needs to know about a stored series, read from its instances' headers.

Facts are read from the stored Part-10 files (headers only, never pixel data) when a series
completes, so the SCP's hot path does not pay for them, and so that an enhanced multi-frame
instance is described by its functional groups as well as a classic one by its top level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.database import Database

log = logging.getLogger(__name__)

# A plane counts as axial/sagittal/coronal when its normal is within ~35 degrees of the axis.
_PLANE_COSINE = 0.8
_PLANES = ("sagittal", "coronal", "axial")  # normal along patient x, y, z (PS3.3 C.7.6.2.1.1)


@dataclass(frozen=True)
class SeriesFacts:
    """The attributes routing rules can test, for one series as stored."""

    series_uid: str
    study_uid: str
    modality: str
    sop_class_uids: frozenset[str]
    body_part: str
    description: str
    protocol: str
    image_type: tuple[str, ...]
    orientation: str | None  # axial, sagittal, coronal, oblique; None without a plane
    slices: int  # frames with pixel data, over all instances
    pixel_spacing_mm: float | None  # the smaller in-plane spacing
    calling_aets: frozenset[str]
    series_number: int | None
    instances: int
    unreadable: int  # stored files whose header could not be read

    @property
    def has_pixels(self) -> bool:
        return self.slices > 0


def plane_of(orientation: list[float] | None) -> str | None:
    """Name the plane of an ImageOrientationPatient (row and column direction cosines)."""
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    length = np.linalg.norm(normal)
    if not np.isfinite(length) or length < 1e-6:
        return None
    normal = np.abs(normal / length)
    axis = int(np.argmax(normal))
    return _PLANES[axis] if normal[axis] >= _PLANE_COSINE else "oblique"


def _functional(ds: Dataset, sequence: str, keyword: str) -> object:
    """An attribute from the shared, else the first per-frame, functional group (PS3.3 C.7.6.16)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups) or []:
            for item in group.get(sequence) or []:
                if keyword in item:
                    return item.get(keyword)
            break  # only the first per-frame item is representative of the orientation
    return None


def _orientation(ds: Dataset) -> list[float] | None:
    value = ds.get("ImageOrientationPatient") or _functional(
        ds, "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    try:
        return [float(v) for v in value] if value else None
    except (TypeError, ValueError):
        return None


def _spacing(ds: Dataset) -> float | None:
    value = (
        ds.get("PixelSpacing")
        or _functional(ds, "PixelMeasuresSequence", "PixelSpacing")
        or ds.get("ImagerPixelSpacing")
    )
    try:
        spacing = min(float(v) for v in value) if value else None
    except (TypeError, ValueError):
        return None
    return spacing if spacing and np.isfinite(spacing) and spacing > 0 else None


def _frames(ds: Dataset) -> int:
    if "Rows" not in ds or "Columns" not in ds:
        return 0
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


@dataclass(frozen=True)
class _Header:
    """What routing reads from one instance's header.

    Read in one go right after the file: pydicom converts values when first touched, so a
    value that cannot be converted (an unknown VR, a nesting too deep) fails here, where the
    instance is counted unreadable, and not later where it would fail the whole routing job.
    """

    frames: int
    plane: str | None
    spacing: float | None
    modality: str
    body_part: str
    description: str
    protocol: str
    image_type: tuple[str, ...]

    @classmethod
    def of(cls, ds: Dataset) -> _Header:
        return cls(
            frames=_frames(ds),
            plane=plane_of(_orientation(ds)),
            spacing=_spacing(ds),
            modality=_text(ds, "Modality").upper(),
            body_part=_text(ds, "BodyPartExamined").upper(),
            description=_text(ds, "SeriesDescription"),
            protocol=_text(ds, "ProtocolName"),
            image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or [])),
        )


def read_series_facts(data_dir: Path, db: Database, series_uid: str) -> SeriesFacts:
    """Describe a stored series from the headers of all its instances."""
    with db.reading() as conn:
        rows = conn.execute(
            "SELECT i.path, i.sop_class_uid, i.calling_aet, s.study_uid, s.series_number"
            " FROM instances i JOIN series s USING (series_uid) WHERE i.series_uid = ?"
            " ORDER BY i.received_at",
            (series_uid,),
        ).fetchall()
    if not rows:
        raise LookupError(f"no stored instances for series {series_uid}")
    headers: list[_Header] = []
    unreadable = 0
    for row in rows:
        try:
            headers.append(_Header.of(dcmread(data_dir / row["path"], stop_before_pixels=True)))
        except Exception as exc:  # any unreadable header: counted and logged, never fatal
            unreadable += 1
            log.warning("cannot read a stored header (%s): %s", type(exc).__name__, row["path"])
    first = headers[0] if headers else _Header.of(Dataset())
    planes = {h.plane for h in headers if h.frames and h.plane}
    spacings = [h.spacing for h in headers if h.spacing is not None]
    return SeriesFacts(
        series_uid=series_uid,
        study_uid=rows[0]["study_uid"],
        modality=first.modality,
        sop_class_uids=frozenset(row["sop_class_uid"] for row in rows),
        body_part=first.body_part,
        description=first.description,
        protocol=first.protocol,
        image_type=first.image_type,
        # Mixed planes (a localizer left in the series) are reported as oblique: no single plane.
        orientation=planes.pop() if len(planes) == 1 else ("oblique" if planes else None),
        slices=sum(h.frames for h in headers),
        pixel_spacing_mm=min(spacings) if spacings else None,
        calling_aets=frozenset(row["calling_aet"] for row in rows),
        series_number=rows[0]["series_number"],
        instances=len(rows),
        unreadable=unreadable,
    )


def study_series(db: Database, study_uid: str) -> list[str]:
    """The series UIDs stored for a study, oldest first."""
    with db.reading() as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT series_uid FROM series WHERE study_uid = ? ORDER BY first_received",
                (study_uid,),
            )
        ]
