"""What routing needs to know about a stored series, read from its instances' headers.

Facts are read from the stored Part-10 files when a series completes, so the SCP's hot path
does not pay for them, and so that an enhanced multi-frame instance is described by its
functional groups (PS3.3 C.7.6.16) as well as a classic one by its top level. Large values
(Pixel Data among them) are not loaded: only whether an instance has pixels is read, and for
MR one frame is decoded to tell a binary mask from an image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from dicom_node.database import Database
from dicom_node.priority import RequestPriority, highest_request_priority

log = logging.getLogger(__name__)

# A plane counts as axial/sagittal/coronal when its normal is within ~35 degrees of the axis.
_PLANE_COSINE = 0.8
_PLANES = ("sagittal", "coronal", "axial")  # normal along patient x, y, z (PS3.3 C.7.6.2.1.1)
# Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3, C.7.6.24).
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Values larger than this are not loaded while the header is read (Pixel Data, CSA blobs).
_DEFER_BYTES = 4096
# Distinct values counted in the sampled frame of an MR series, at most (a mask has 2).
_DISTINCT_CAP = 3


@dataclass(frozen=True)
class MrAcquisition:
    """The MR acquisition attributes that tell a sequence's weighting (PS3.3 C.8.3.1, C.8.13).

    Read from the top level of a classic MR image or from the functional groups and the
    enhanced MR modules of a multi-frame one; values absent from the header are None or empty.
    Times are in ms; ``echo_times_ms`` holds every distinct echo time of the series.
    """

    scanning_sequence: tuple[str, ...] = ()  # (0018,0020) SE, IR, GR, EP, RM
    sequence_variant: tuple[str, ...] = ()  # (0018,0021) SK, MTC, SS, TRSS, SP, MP, OSP
    scan_options: tuple[str, ...] = ()  # (0018,0022) IR, FS, ... and vendors' own (IR_GEMS)
    sequence_name: str = ""  # (0018,0024), or Pulse Sequence Name (0018,9005)
    acquisition_type: str = ""  # (0018,0023) 2D or 3D
    repetition_time_ms: float | None = None
    echo_times_ms: tuple[float, ...] = ()
    inversion_time_ms: float | None = None  # None: not given, or 0 (no inversion)
    flip_angle: float | None = None
    angio: bool = False  # Angio Flag (0018,0025) Y, or Time of Flight Contrast YES
    echo_pulse_sequence: str = ""  # (0018,9008) SPIN, GRADIENT, BOTH
    echo_planar: bool | None = None  # (0018,9018)
    inversion_recovery: bool | None = None  # (0018,9009)
    steady_state: str = ""  # (0018,9017) FREE_PRECESSION, TRANSVERSE, TIME_REVERSED, ...
    acquisition_contrast: str = ""  # (0008,9209) T1, T2, FLUID_ATTENUATED, DIFFUSION, ...
    complex_component: str = ""  # (0008,9208) MAGNITUDE, PHASE, REAL, IMAGINARY, MIXED
    contrast_agent: str = ""  # Contrast/Bolus Agent (0018,0010) or its coded sequence
    contrast_administered: bool = False  # Contrast/Bolus Agent Administered (0018,9342) YES
    max_b_value: float | None = None  # Diffusion b-value (0018,9087), the largest
    temporal_positions: int = 1  # Number of Temporal Positions, or distinct indices
    images_per_position: int = 1  # most images sharing one Image Position (Patient)
    bits_stored: int | None = None
    largest_pixel_value: float | None = None  # (0028,0107), when the header gives it
    distinct_pixel_values: int | None = None  # in one decoded frame, capped at 3


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
    mr: MrAcquisition = field(default_factory=MrAcquisition)
    station_name: str = ""  # StationName (0008,1010) of the first readable instance
    # The highest C-STORE Priority (PS3.7 9.1.1.1) its instances were sent with; None when
    # not recorded (files given to 'dicom-node run', instances stored before it was).
    request_priority: RequestPriority | None = None

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


def _functional(ds: Dataset, sequence: str, keyword: str) -> Any:
    """An attribute from the shared, else the first per-frame, functional group (PS3.3 C.7.6.16):
    its value, typed as pydicom types it by VR and VM (Any)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups) or []:
            for item in group.get(sequence) or []:
                if keyword in item:
                    return item.get(keyword)
            break  # only the first per-frame item is representative of the orientation
    return None


def _per_frame(ds: Dataset, sequence: str, keyword: str) -> list[object]:
    """An attribute of every frame: from the shared group, else from each per-frame group."""
    shared = [
        item.get(keyword)
        for group in (ds.get("SharedFunctionalGroupsSequence") or [])[:1]
        for item in group.get(sequence) or []
        if keyword in item
    ]
    if shared:
        return shared
    return [
        item.get(keyword)
        for group in ds.get("PerFrameFunctionalGroupsSequence") or []
        for item in group.get(sequence) or []
        if keyword in item
    ]


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
    """Frames that carry pixels: none without Pixel Data, whatever Rows and Columns say."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return 0
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _codes(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued CS as upper-case tokens; a single value with backslashes is split too."""
    value = ds.get(keyword)
    if value is None:
        return ()
    values = [value] if isinstance(value, str | bytes) else list(value)
    return tuple(str(v).strip().upper() for v in values if str(v).strip())


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _numbers(values: Iterable[object]) -> list[float]:
    return [n for n in (_number(v) for v in values) if n is not None]


def _yes(value: object) -> bool | None:
    text = str(value).strip().upper() if value is not None else ""
    return True if text == "YES" else False if text == "NO" else None


def _contrast_agent(ds: Dataset) -> tuple[str, bool]:
    """The agent named (classic 0018,0010, or the enhanced coded sequence) and whether the
    enhanced Contrast/Bolus Usage says it was administered (PS3.3 C.7.6.4, C.7.6.4b)."""
    agent = _text(ds, "ContrastBolusAgent")
    if not agent:
        for item in ds.get("ContrastBolusAgentSequence") or []:
            agent = _text(item, "CodeMeaning") or _text(item, "CodeValue")
            if agent:
                break
    usage = _per_frame(ds, "ContrastBolusUsageSequence", "ContrastBolusAgentAdministered")
    return agent, any(_yes(v) for v in usage)


@dataclass(frozen=True)
class _MrHeader:
    """The MR attributes of one instance, before they are merged over the series: its
    acquisition as one header gives it, its diffusion b-values and its position."""

    acquisition: MrAcquisition
    b_values: tuple[float, ...]
    position: tuple[float, ...] | None

    @classmethod
    def of(cls, ds: Dataset) -> _MrHeader:
        def timing(keyword: str) -> float | None:
            values = [ds.get(keyword)] if keyword in ds else []
            values += _per_frame(ds, "MRTimingAndRelatedParametersSequence", keyword)[:1]
            found = _numbers(values)
            return found[0] if found else None

        echoes = _numbers([ds.get("EchoTime")] if "EchoTime" in ds else [])
        echoes += _numbers(_per_frame(ds, "MREchoSequence", "EffectiveEchoTime"))
        inversion = _numbers([ds.get("InversionTime")] if "InversionTime" in ds else [])
        inversion += _numbers(
            v
            for times in _per_frame(ds, "MRModifierSequence", "InversionTimes")
            for v in (times if isinstance(times, list | tuple) else [times])
        )
        inversion = [t for t in inversion if t > 0]  # Philips writes 0 for "no inversion"
        recovery = _yes(ds.get("InversionRecovery"))
        if recovery is None:
            modifier = _per_frame(ds, "MRModifierSequence", "InversionRecovery")
            recovery = _yes(modifier[0]) if modifier else None
        frame_type = _per_frame(ds, "MRImageFrameTypeSequence", "AcquisitionContrast")
        complex_part = _per_frame(ds, "MRImageFrameTypeSequence", "ComplexImageComponent")
        b_values = _numbers([ds.get("DiffusionBValue")] if "DiffusionBValue" in ds else [])
        b_values += _numbers(_per_frame(ds, "MRDiffusionSequence", "DiffusionBValue"))
        temporal = _number(ds.get("NumberOfTemporalPositions")) or 1
        indices = _per_frame(ds, "FrameContentSequence", "TemporalPositionIndex")
        agent, administered = _contrast_agent(ds)
        position = _numbers(ds.get("ImagePositionPatient") or [])
        largest = ds.get("LargestImagePixelValue")
        acquisition = MrAcquisition(
            scanning_sequence=_codes(ds, "ScanningSequence"),
            sequence_variant=_codes(ds, "SequenceVariant"),
            scan_options=_codes(ds, "ScanOptions"),
            sequence_name=_text(ds, "SequenceName") or _text(ds, "PulseSequenceName"),
            acquisition_type=_text(ds, "MRAcquisitionType").upper(),
            repetition_time_ms=timing("RepetitionTime"),
            echo_times_ms=tuple(sorted({round(t, 1) for t in echoes if t > 0})),
            inversion_time_ms=inversion[0] if inversion else None,
            flip_angle=timing("FlipAngle"),
            angio=_text(ds, "AngioFlag").upper() == "Y"
            or _yes(ds.get("TimeOfFlightContrast")) is True,
            echo_pulse_sequence=_text(ds, "EchoPulseSequence").upper(),
            echo_planar=_yes(ds.get("EchoPlanarPulseSequence")),
            inversion_recovery=recovery,
            steady_state=_text(ds, "SteadyStatePulseSequence").upper(),
            acquisition_contrast=(
                _text(ds, "AcquisitionContrast") or (str(frame_type[0]) if frame_type else "")
            ).upper(),
            complex_component=(
                _text(ds, "ComplexImageComponent") or (str(complex_part[0]) if complex_part else "")
            ).upper(),
            contrast_agent=agent,
            contrast_administered=administered,
            temporal_positions=max(int(temporal), len(set(map(str, indices))) or 1),
            bits_stored=int(ds.BitsStored) if _number(ds.get("BitsStored")) else None,
            largest_pixel_value=_number(largest) if not isinstance(largest, bytes) else None,
        )
        return cls(
            acquisition,
            b_values=tuple(b_values),
            position=tuple(round(v, 2) for v in position) if len(position) == 3 else None,
        )


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
    series_uid: str
    study_uid: str
    sop_class_uid: str
    series_number: int | None
    mr: _MrHeader | None
    station_name: str

    @classmethod
    def of(cls, ds: Dataset) -> _Header:
        modality = _text(ds, "Modality").upper()
        number = _number(ds.get("SeriesNumber"))
        return cls(
            frames=_frames(ds),
            plane=plane_of(_orientation(ds)),
            spacing=_spacing(ds),
            modality=modality,
            body_part=_text(ds, "BodyPartExamined").upper(),
            description=_text(ds, "SeriesDescription"),
            protocol=_text(ds, "ProtocolName"),
            image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or [])),
            series_uid=_text(ds, "SeriesInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            series_number=int(number) if number is not None else None,
            mr=_MrHeader.of(ds) if modality == "MR" else None,
            station_name=_text(ds, "StationName"),
        )


def _distinct_values(path: Path, frames: int) -> int | None:
    """Distinct stored values (at most 3) in the middle frame of an instance; None when its
    pixels cannot be decoded here (the routing decision then rests on the headers alone)."""
    try:
        frame = pixel_array(path, index=frames // 2 if frames > 1 else None)
    except Exception as exc:  # an undecodable transfer syntax is not a routing failure
        log.debug("no pixel sample of %s (%s)", path.name, type(exc).__name__)
        return None
    values = np.unique(frame)
    return min(len(values), _DISTINCT_CAP)


def _merge_mr(headers: Sequence[_MrHeader], sample: int | None) -> MrAcquisition:
    """One series' MR acquisition: the first instance's settings, the echo times, b-values and
    positions of all of them (a dual-echo or dynamic series shows itself only across files)."""
    first = headers[0].acquisition
    acquisitions = [h.acquisition for h in headers]
    positions: dict[tuple[float, ...], int] = {}
    for h in headers:
        if h.position is not None:
            positions[h.position] = positions.get(h.position, 0) + 1
    b_values = [b for h in headers for b in h.b_values]
    largest = [a.largest_pixel_value for a in acquisitions if a.largest_pixel_value is not None]
    return replace(
        first,
        echo_times_ms=tuple(sorted({t for a in acquisitions for t in a.echo_times_ms})),
        contrast_administered=any(a.contrast_administered for a in acquisitions),
        max_b_value=max(b_values) if b_values else None,
        temporal_positions=max(a.temporal_positions for a in acquisitions),
        images_per_position=max(positions.values(), default=1),
        largest_pixel_value=max(largest) if largest else None,
        distinct_pixel_values=sample,
    )


def describe_series(
    paths: Sequence[Path],
    *,
    calling_aets: frozenset[str] = frozenset(),
    request_priority: RequestPriority | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int | None = None,
) -> SeriesFacts:
    """Describe one series from the headers of its files (the node's stored instances, or a
    folder given to ``dicom-node run``). UIDs and the series number not given are taken from
    the first readable header."""
    headers: list[_Header] = []
    readable: list[Path] = []
    unreadable = 0
    for path in paths:
        try:
            headers.append(_Header.of(dcmread(path, defer_size=_DEFER_BYTES)))
            readable.append(path)
        except Exception as exc:  # any unreadable header: counted and logged, never fatal
            unreadable += 1
            log.warning("cannot read a stored header (%s): %s", type(exc).__name__, path)
    first = headers[0] if headers else _Header.of(Dataset())
    planes = {h.plane for h in headers if h.frames and h.plane}
    spacings = [h.spacing for h in headers if h.spacing is not None]
    mr = [h.mr for h in headers if h.mr is not None]
    with_pixels = [(p, h.frames) for p, h in zip(readable, headers, strict=True) if h.frames]
    sample = None
    if mr and with_pixels:
        # One frame of the middle instance: enough to tell a binary mask from an image.
        sample = _distinct_values(*with_pixels[len(with_pixels) // 2])
    return SeriesFacts(
        series_uid=series_uid or first.series_uid,
        study_uid=study_uid or first.study_uid,
        modality=first.modality,
        sop_class_uids=frozenset(h.sop_class_uid for h in headers),
        body_part=first.body_part,
        description=first.description,
        protocol=first.protocol,
        image_type=first.image_type,
        # Mixed planes (a localizer left in the series) are reported as oblique: no single plane.
        orientation=planes.pop() if len(planes) == 1 else ("oblique" if planes else None),
        slices=sum(h.frames for h in headers),
        pixel_spacing_mm=min(spacings) if spacings else None,
        calling_aets=calling_aets,
        series_number=series_number if series_number is not None else first.series_number,
        instances=len(paths),
        unreadable=unreadable,
        mr=_merge_mr(mr, sample) if mr else MrAcquisition(),
        station_name=first.station_name,
        request_priority=request_priority,
    )


def read_series_facts(data_dir: Path, db: Database, series_uid: str) -> SeriesFacts:
    """Describe a stored series from the headers of all its instances."""
    with db.reading() as conn:
        rows = conn.execute(
            "SELECT i.path, i.sop_class_uid, i.calling_aet, i.request_priority, s.study_uid,"
            " s.series_number"
            " FROM instances i JOIN series s USING (series_uid) WHERE i.series_uid = ?"
            " ORDER BY i.received_at",
            (series_uid,),
        ).fetchall()
    if not rows:
        raise LookupError(f"no stored instances for series {series_uid}")
    facts = describe_series(
        [data_dir / row["path"] for row in rows],
        calling_aets=frozenset(row["calling_aet"] for row in rows),
        request_priority=highest_request_priority(row["request_priority"] for row in rows),
        series_uid=series_uid,
        study_uid=rows[0]["study_uid"],
        series_number=rows[0]["series_number"],
    )
    # The SOP classes the node negotiated and indexed, also for files it cannot read back.
    return replace(facts, sop_class_uids=frozenset(row["sop_class_uid"] for row in rows))


def series_paths(data_dir: Path, db: Database, series_uids: Iterable[str]) -> list[Path]:
    """The stored files of some series (what an audit record names the studies of)."""
    with db.reading() as conn:
        return [
            data_dir / row[0]
            for uid in dict.fromkeys(series_uids)
            for row in conn.execute("SELECT path FROM instances WHERE series_uid = ?", (uid,))
        ]


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
