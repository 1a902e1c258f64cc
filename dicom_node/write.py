"""Write algorithm results as DICOM: Segmentation (PS3.3 A.51) from label masks.

Algorithms return plain data; this stage turns it into standard objects in the source's study.
Geometry is where AI nodes go wrong (shifted or flipped overlays), so it is checked rather than
assumed: masks are in the grid of the source's highdicom volume, and each source instance is
placed in that grid by its own ImagePositionPatient before highdicom pairs frames with source
images (highdicom never sorts, and an unsorted list silently misplaces frames).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import format_number_as_ds

from dicom_node import __version__
from dicom_node.algorithm import DEMO_WARNING, AlgorithmResult, Concept, SeriesInput, Weights
from dicom_node.burn_in import TooSmallForText, burn_in
from dicom_node.config import ResultsConfig
from dicom_node.copied import WriteError, copyable
from dicom_node.display import displayed_image

log = logging.getLogger(__name__)


def _memoise_iod_lookups() -> None:
    """highdicom 0.28 rescans the standard's module tables for every referenced image (about
    3 ms each: 1.6 s of the 2 s a four-sequence MR SEG took, for its 620 references). The
    answer depends on the attribute and the SOP class only, so it is memoised where
    highdicom's own helpers look it up."""
    from highdicom import _standard_utils

    lookup = _standard_utils.is_attribute_in_iod
    if getattr(lookup, "memoised", False):
        return
    answers: dict[tuple, bool] = {}

    def memoised(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        key = (
            attribute,
            sop_class_uid,
            None if exclude_path_elements is None else tuple(exclude_path_elements),
        )
        if key not in answers:
            answers[key] = lookup(attribute, sop_class_uid, exclude_path_elements)
        return answers[key]

    memoised.memoised = True  # type: ignore[attr-defined]
    _standard_utils.is_attribute_in_iod = memoised


_memoise_iod_lookups()

MANUFACTURER = "dicom-node"
MODEL_NAME = "dicom-node"
# Distinct hues for up to eight segments, as CIELab (L*, a*, b*): red, green, blue, yellow,
# magenta, cyan, orange, violet. Viewers that honour RecommendedDisplayCIELabValue show these.
PALETTE = (
    (53.2, 80.1, 67.2),
    (87.7, -86.2, 83.2),
    (32.3, 79.2, -107.9),
    (97.1, -21.6, 94.5),
    (60.3, 98.3, -60.8),
    (91.1, -48.1, -14.1),
    (74.9, 23.9, 78.9),
    (45.4, 78.0, -78.0),
)


_DEFINED_CHARACTER_SETS = frozenset(v.value for v in hd.SpecificCharacterSetValues)


def character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set for an object that copies its patient's names.

    highdicom refuses two valid forms (PS3.3 C.12.1.1.2), so they are given in the form it
    takes, meaning the same: an empty value 1 with code extensions, as Japanese sites send
    ``\\ISO 2022 IR 87``, is the default repertoire, ISO 2022 IR 6; a single-byte term with
    code extensions used alone needs no escape sequence and is its term without them, and
    ISO_IR 6 (not a defined term, often sent) is the default repertoire. Another term the
    standard does not define is refused: the names could not be encoded for sure.
    """
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    terms = [str(v).strip() for v in ([value] if isinstance(value, str) else value)]
    if len(terms) > 1 and terms[0] == "":
        terms[0] = "ISO 2022 IR 6"
    elif len(terms) == 1:
        if terms[0] in ("ISO 2022 IR 6", "ISO_IR 6"):  # the default repertoire, said aloud
            return None
        plain = terms[0].replace("ISO 2022 IR ", "ISO_IR ")
        if plain in _DEFINED_CHARACTER_SETS:
            terms = [plain]
    undefined = [t for t in terms if t not in _DEFINED_CHARACTER_SETS]
    if undefined:
        raise WriteError(
            f"the source's SpecificCharacterSet {undefined[0]!r} is not a defined term "
            "(PS3.3 C.12.1.1.2): the patient's names cannot be written for sure"
        )
    return terms[0] if len(terms) == 1 else terms


@dataclass(frozen=True)
class Provenance:
    """Who made a result: the algorithm, its version and its weights."""

    algorithm: str
    version: str
    weights: Weights
    description: str = "AI {algorithm} {kind}"  # results.series_description

    @property
    def weights_kind(self) -> str:
        """DEMO (ours, trained on phantoms), none (image processing), or the user's own."""
        if self.weights.demo:
            return "DEMO"
        return "none" if self.weights.path is None else "public"

    @property
    def weights_label(self) -> str:
        """The SR's algorithm parameter: DEMO, none, or the public weights' SHA-256."""
        return self.weights.sha256 if self.weights_kind == "public" else self.weights_kind

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification (PS3.3 C.8.20.2) with the weights' SHA-256 as a parameter."""
        parameters = {"weights": self.weights_kind}
        if self.weights.sha256:
            parameters["weights_sha256"] = self.weights.sha256
        return hd.AlgorithmIdentificationSequence(
            name=self.algorithm,
            family=codes.DCM.ArtificialIntelligence,
            version=self.version,
            source=MANUFACTURER,
            parameters=parameters,
        )

    def series_description(self, kind: str, source: Dataset | None = None) -> str:
        """E.g. "AI lung-nodules-ct SEG: Thorax 1.0 B70f": the configured text, then the
        source series' description, so that the results of two reconstructions of one study
        can be told apart in a PACS list. With demo weights the DEMO warning comes first
        (whatever the configured text). At most 64 characters (LO, PS3.5 6.2).

        When the source's description would keep fewer than :data:`SOURCE_CHARACTERS` of its
        characters, the algorithm's name is left out of the text (it is in every result's
        Algorithm Identification) rather than the source's description cut short.
        """
        prefix = f"{DEMO_WARNING} " if self.weights.demo else ""
        label = self.description.format(algorithm=self.algorithm, kind=kind)
        of = str(source.get("SeriesDescription") or "").strip() if source is not None else ""
        if not of:
            return (prefix + label)[:64]
        if len(prefix) + len(label) + 2 + min(len(of), SOURCE_CHARACTERS) > 64:
            label = " ".join(self.description.format(algorithm="", kind=kind).split())
        return (prefix + (f"{label}: {of}" if label else of))[:64]


# How much of the source series' description a result's description keeps at least.
SOURCE_CHARACTERS = 24
# The last two digits of a result's Series Number: which kind of result it is.
RESULT_SUFFIX = {"SEG": 1, "SR": 2, "SC": 3}
_LARGEST_IS = 2**31 - 1  # PS3.5 6.2: IS is a signed 32-bit integer


def result_series_number(source: Dataset, kind: str, configured: int) -> int:
    """The Series Number of ``kind``'s result of the source series: the source's number
    followed by two digits, 01 for the SEG, 02 for the SR, 03 for the SC (series 3 gives
    301, 302, 303; series 12 gives 1201 ...).

    A reader sees which series a result belongs to from its number alone, the results of
    two reconstructions of one study differ, and each result sorts after the acquisitions of
    a usual study (numbered below 100); it is how Philips scanners number the series they
    derive. The configured number is used when the source has no usable Series Number
    (Type 2, so it may be empty) or one that the suffix would take past the largest IS.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warning quotes the value
        try:
            number = int(source.get("SeriesNumber"))
        except (TypeError, ValueError):
            return configured
    if number < 1 or number * 100 + 99 > _LARGEST_IS:
        return configured
    return number * 100 + RESULT_SUFFIX[kind]


def code(concept: Concept) -> Code:
    return Code(concept.value, concept.scheme, concept.meaning)


def spatially_ordered(series: SeriesInput) -> tuple[hd.Volume, list[Dataset]]:
    """The series' volume and its instances in the volume's frame order.

    Each instance is located by mapping its ImagePositionPatient into the volume's indices:
    it must land on frame ``k``'s first voxel, (k, 0, 0), or the volume and the instances
    disagree (rows or columns flipped, frames missing) and nothing is written.
    """
    volume = series.volume()
    datasets = copyable(series.datasets())
    if len(datasets) == 1:
        return volume, datasets  # one instance: a multi-frame image or a single slice
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    indices = volume.map_reference_to_indices(positions)
    frames = np.rint(indices[:, 0]).astype(int)
    if not np.allclose(indices, np.stack([frames, 0 * frames, 0 * frames], axis=1), atol=1e-3):
        raise WriteError(f"series {series.series_uid}: instances do not tile its volume")
    if sorted(frames.tolist()) != list(range(volume.spatial_shape[0])):
        raise WriteError(f"series {series.series_uid}: instances and volume frames differ")
    return volume, [datasets[i] for i in np.argsort(frames)]


def segmentation(
    result: AlgorithmResult,
    inputs: dict[str, SeriesInput],
    provenance: Provenance,
    *,
    series_number: int,
    instance_number: int = 1,
    further_sources: Sequence[str] = (),
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """One BINARY Segmentation holding every mask of ``result``, one segment each.

    All masks must be in the grid of one input (the source images); the inputs named in
    ``further_sources`` are referenced as Further Source Images (e.g. the other sequences of
    an MR study). With ``omit_empty_frames`` a segment has frames only where it has pixels
    (all frames are kept when every mask is empty); each frame names its source image.
    """
    if not result.masks:
        raise WriteError("the result has no masks to write as a segmentation")
    sources = {m.source for m in result.masks}
    if len(sources) != 1:
        raise WriteError(f"masks are on several inputs' grids ({sorted(sources)}): one SEG each")
    (source,) = sources
    volume, datasets = spatially_ordered(inputs[source])
    masks = np.stack([m.array for m in result.masks], axis=-1)
    if masks.shape[:3] != volume.spatial_shape:
        raise WriteError(
            f"masks {masks.shape[:3]} are not on {source}'s grid {volume.spatial_shape}"
        )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=mask.name[:64],
            segmented_property_category=code(mask.category),
            segmented_property_type=code(_required(mask.property_type, mask.name)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=provenance.identification(),
            tracking_uid=hd.UID(),
            tracking_id=f"{provenance.algorithm} {mask.name}"[:64],
            anatomic_regions=[code(mask.anatomy)] if mask.anatomy else None,
            display_color=hd.color.CIELabColor(*PALETTE[(number - 1) % len(PALETTE)]),
        )
        for number, mask in enumerate(result.masks, 1)
    ]
    further = copyable([ds for name in further_sources for ds in inputs[name].datasets()])
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number="0",
        omit_empty_frames=omit_empty_frames,
        series_description=provenance.series_description("SEG", datasets[0]),
        content_description=(DEMO_WARNING if result.demo else None),
        content_label="AI_SEG",
        # The algorithm made it (PS3.3 C.10.9): as a name, since PN has no device form.
        content_creator_name=f"{provenance.algorithm}^",
        further_source_images=further or None,
        specific_character_set=character_set(datasets[0]),
    )
    # highdicom copies the sources' SpacingBetweenSlices into the SEG, and scanners fill it
    # with other things (the gap, the reconstruction interval): the real spacing replaces it.
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    spacing = format_number_as_ds(float(volume.spacing_between_slices))
    if "SpacingBetweenSlices" in measures:
        measures.SpacingBetweenSlices = spacing
    if not _positive_number(measures.get("SliceThickness")):
        # Type 2 in the source's Image Plane module, Type 1 in the SEG's Pixel Measures (PS3.3
        # C.7.6.16.2.1): without the source's, the SEG's slices are as thick as they are
        # apart, as highdicom writes it for a SEG made from a volume.
        measures.SliceThickness = spacing
    return seg


def _positive_number(value: object) -> bool:
    try:
        return float(value) > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _required(concept: Concept | None, name: str) -> Concept:
    if concept is None:
        raise WriteError(f"mask {name!r} does not say what it is (property_type)")
    return concept


FINDING = Concept("SCT", "404684003", "Clinical finding")  # when an algorithm names none
MILLILITER = Code("mL", "UCUM", "milliliter")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")


def _tracking(identifier: str, uid: str | None = None) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=uid or hd.UID(), identifier=identifier[:64])


def _region(points: np.ndarray, source: Dataset) -> hd.sr.ImageRegion:
    """A closed POLYLINE on ``source``; points are (column, row) with the top-left corner of
    the top-left pixel at (0, 0), so a pixel centre (r, c) is at (c + 0.5, r + 0.5) (PS3.3
    C.18.6.1.1). Viewers (OHIF included) draw 2D regions; they do not draw SCOORD3D points.
    """
    closed = np.concatenate([points, points[:1]]).astype(np.float32)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=closed,
        source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID),
    )


def _circle_on_slice(
    center_lps_mm: Sequence[float], diameter_mm: float, volume: hd.Volume, datasets: list[Dataset]
) -> hd.sr.ImageRegion:
    """A circle (32-sided polygon) on the source slice through ``center_lps_mm`` (TID 1410)."""
    frame, row, column = volume.map_reference_to_indices(np.array([center_lps_mm], float))[0]
    frame = int(np.clip(np.rint(frame), 0, len(datasets) - 1))
    row_mm, column_mm = (float(v) for v in volume.pixel_spacing)
    angles = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
    radius = max(diameter_mm, 1.0) / 2.0
    points = np.stack(
        [
            column + 0.5 + radius / column_mm * np.cos(angles),
            row + 0.5 + radius / row_mm * np.sin(angles),
        ],
        axis=1,
    )
    return _region(points, datasets[frame])


def _outline_of_largest_section(
    mask: np.ndarray, volume: hd.Volume, datasets: list[Dataset]
) -> tuple[hd.sr.ImageRegion, float]:
    """The outline of ``mask``'s largest connected cross-section on the source slice where the
    mask is largest, and that section's area in mm2: the representative slice a reader looks
    at first (as in bidimensional tumour measurement), and what 2D viewers can draw.
    """
    import cv2

    frame = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask[frame].astype(np.uint8), connectivity=8
    )
    if count < 2:
        raise WriteError("an empty mask has no section to outline")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    section = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(section, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    points = max(contours, key=len).reshape(-1, 2).astype(float) + 0.5  # pixel centres
    if len(points) < 3:  # a section one pixel wide: its pixels' edges instead
        (x0, y0), (x1, y1) = points.min(axis=0) - 0.5, points.max(axis=0) + 0.5
        points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    row_mm, column_mm = (float(v) for v in volume.pixel_spacing)
    area = float(stats[largest, cv2.CC_STAT_AREA]) * row_mm * column_mm
    return _region(points, datasets[frame]), area


def measurement_report(
    result: AlgorithmResult,
    inputs: dict[str, SeriesInput],
    provenance: Provenance,
    *,
    series_number: int,
    segmentation: hd.seg.Segmentation | None = None,
    source: str = "series",
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of ``result``, observed by the algorithm as a device.

    - each finding: a planar group (TID 1410) with a circle on the source slice through its
      centre, its long-axis diameter and score, and when it is outlined in ``segmentation`` a
      volumetric group (TID 1411) on that segment with its volume;
    - each mask no finding outlines: a planar group outlining its largest section on the slice
      where it is largest, with that section's area (none for an empty mask), and a volumetric
      group on its segment with its volume in mL;
    - each classification: a TID 1501 group, Present or Absent against its threshold, with
      its probability and the image it was made on;
    - each type in ``result.looked_for`` that nothing was found of: a TID 1501 group saying
      Absent, so that "nothing found" is a statement rather than a silence.
    """
    if result.findings or segmentation is not None:
        volume, datasets = spatially_ordered(inputs[source])
    else:  # classifications only: a radiograph may have no position to build a volume from
        volume, datasets = None, copyable(inputs[source].datasets())
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=provenance.algorithm,
            manufacturer_name=MANUFACTURER,
            model_name=f"{provenance.algorithm} {provenance.version}",
        ),
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=provenance.algorithm,
        version=provenance.version,
        parameters=[f"weights {provenance.weights_label}"],
    )
    segment_numbers = {m.name: n for n, m in enumerate(result.masks, 1)}
    outlined = {f.mask for f in result.findings if f.mask}
    groups: list = []

    def lesion(
        identifier: str,
        mask: str | None,
        finding_type: Code,
        sites: list | None,
        region: hd.sr.ImageRegion | None,
        measurements: list[hd.sr.Measurement],
        volume_unit: Code,
    ) -> None:
        # One lesion, one tracking UID: its SEG segment's, shared by its planar and volumetric
        # groups (PS3.16 TID 1410/1411); OHIF merges groups by that UID into one measurement
        # and cannot show a volumetric group that has no 2D region beside it.
        number = segment_numbers.get(mask) if mask and segmentation is not None else None
        uid = segmentation.SegmentSequence[number - 1].TrackingUID if number else None
        if region is not None:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(identifier, uid),
                    referenced_region=region,
                    finding_type=finding_type,
                    finding_sites=sites,
                    algorithm_id=algorithm_id,
                    measurements=measurements,
                )
            )
        if number:
            groups.append(
                _volumetric(
                    result,
                    segmentation,
                    number,
                    volume,
                    identifier,
                    finding_type,
                    sites,
                    algorithm_id,
                    volume_unit,
                )
            )

    for number, finding in enumerate(result.findings, 1):
        diameter = max(finding.size_mm)
        lesion(
            f"{finding.label} {number}",
            finding.mask,
            code(finding.finding_type or FINDING),
            [hd.sr.FindingSite(code(finding.site))] if finding.site else None,
            _circle_on_slice(finding.center_lps_mm, diameter, volume, datasets),
            [
                hd.sr.Measurement(codes.SCT.Diameter, diameter, codes.UCUM.Millimeter),
                hd.sr.Measurement(codes.DCM.Probability, finding.score, codes.UCUM.NoUnits),
            ],
            codes.UCUM.CubicMillimeter,
        )
    for mask in result.masks if segmentation is not None else []:
        if mask.name in outlined:
            continue
        # An empty mask is still stated (a volume of 0 mL) but has no section to draw.
        outline, area = (
            _outline_of_largest_section(mask.array, volume, datasets)
            if mask.array.any()
            else (None, 0.0)
        )
        lesion(
            mask.name,
            mask.name,
            code(mask.property_type or FINDING),
            [hd.sr.FindingSite(code(mask.anatomy))] if mask.anatomy else None,
            outline,
            [hd.sr.Measurement(codes.SCT.Area, round(area, 2), codes.UCUM.SquareMillimeter)],
            MILLILITER,
        )
    # A classification is made on one image (a radiograph); referenced when there is one.
    image = (
        [hd.sr.SourceImageForMeasurementGroup(datasets[0].SOPClassUID, datasets[0].SOPInstanceUID)]
        if len(datasets) == 1
        else None
    )
    for classification in result.classifications:
        concept = code(
            classification.finding
            or Concept("99DCMNODE", classification.label, classification.label)
        )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(classification.label),
                finding_type=concept,
                algorithm_id=algorithm_id,
                source_images=image,
                measurements=[
                    hd.sr.Measurement(
                        codes.DCM.Probability, classification.probability, codes.UCUM.NoUnits
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        concept, codes.SCT.Present if classification.positive else codes.SCT.Absent
                    )
                ],
            )
        )
    found = {f.finding_type for f in result.findings}
    for concept in result.looked_for:
        if concept not in found:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(f"no {concept.meaning}"),
                    finding_type=code(concept),
                    algorithm_id=algorithm_id,
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(code(concept), codes.SCT.Absent)
                    ],
                )
            )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    evidence = [*datasets, *([segmentation] if segmentation is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=provenance.series_description("SR", datasets[0]),
        specific_character_set=character_set(evidence[0]),
    )


def _volumetric(
    result: AlgorithmResult,
    segmentation: hd.seg.Segmentation,
    number: int,
    volume: hd.Volume,
    identifier: str,
    finding_type: Code,
    sites: list | None,
    algorithm_id: hd.sr.AlgorithmIdentification,
    unit: Code,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 on segment ``number``, tracked by the segment's own UID, with its volume."""
    segment = segmentation.SegmentSequence[number - 1]
    cubic_mm = float(result.masks[number - 1].array.sum()) * float(volume.voxel_volume)
    value = cubic_mm / 1000.0 if unit == MILLILITER else cubic_mm
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(identifier, segment.TrackingUID),
        # Not ReferencedSegment.from_segmentation: with one segment highdicom keeps the segment
        # identification in the shared functional groups, where that method does not look.
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(
                segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID
            ),
        ),
        finding_type=finding_type,
        finding_sites=sites,
        algorithm_id=algorithm_id,
        measurements=[hd.sr.Measurement(codes.SCT.Volume, round(value, 4), unit)],
    )


def heat_map_capture(
    result: AlgorithmResult,
    inputs: dict[str, SeriesInput],
    provenance: Provenance,
    *,
    series_number: int,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture of the radiograph with the heat map laid over it and the
    finding, probability and (with demo weights) the DEMO warning burned in.

    The burned-in text is why BurnedInAnnotation is YES: a PACS must not strip or hide it.
    """
    import cv2

    if len(result.heatmaps) != 1:
        raise WriteError(f"expected one heat map, the result has {len(result.heatmaps)}")
    (heat,) = result.heatmaps
    (reference,) = copyable(inputs[heat.source].datasets())
    image = displayed_image(reference)
    if heat.array.shape != image.shape:
        raise WriteError(f"heat map {heat.array.shape} is not on the image grid {image.shape}")
    low, high = float(image.min()), float(image.max())
    grey = ((image - low) / max(high - low, 1e-6) * 255.0).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    weight = np.clip(heat.array, 0.0, 1.0)
    colour = cv2.applyColorMap((weight * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    alpha = (0.5 * weight * (weight >= 0.2))[..., None]  # faint warmth stays unpainted
    picture = (rgb * (1.0 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    lines = [f"AI {provenance.algorithm} {provenance.version}: {heat.name}"]
    for c in result.classifications:
        verdict = "POSITIVE" if c.positive else "negative"
        lines.append(f"{c.label}: {verdict}  p={c.probability:.2f} (threshold {c.threshold:.2f})")
    if provenance.weights.demo:
        lines.append(DEMO_WARNING)
    try:
        burn_in(picture, lines)
    except TooSmallForText as exc:
        # Without its text the capture would not say what it shows (nor DEMO, in its pixels).
        raise WriteError(f"heat-map capture: {exc}") from exc
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(picture),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom needs two single biped letters here; what the SC says is set below.
        patient_orientation=("L", "F"),
        series_description=provenance.series_description("heat map", reference),
        specific_character_set=character_set(reference),
    )
    capture.BurnedInAnnotation = "YES"
    # Patient Orientation is Type 2C (PS3.3 C.7.6.1: an SC has no Image Plane module), so it
    # is the source's (already checked by copyable) or empty, never invented.
    capture.PatientOrientation = reference.get("PatientOrientation") or ""
    part = reference.get("BodyPartExamined")
    if part:
        capture.BodyPartExamined = part
    # Laterality is Type 2C (PS3.3 C.7.3.1): needed for a paired body part (or none named,
    # which validators must take as paired) unless Image Laterality is there. The side is the
    # source's or, unknown, empty: never guessed.
    if reference.get("Laterality"):
        capture.Laterality = reference.Laterality
    elif reference.get("ImageLaterality"):
        capture.ImageLaterality = reference.ImageLaterality
    elif not part or _paired(str(part)):
        capture.Laterality = ""
    return capture


def _paired(body_part: str) -> bool:
    """Whether a Body Part Examined names a paired structure (PS3.16 Annex L); a term the
    standard does not define counts as paired, since its side cannot be ruled out."""
    from highdicom._standard_utils import get_anatomic_region_map

    known = get_anatomic_region_map().get(body_part)
    return True if known is None else bool(known[1])


@dataclass(frozen=True)
class Written:
    """One DICOM object written for a result."""

    kind: str  # SEG, SR or SC
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str


def write_all(
    result: AlgorithmResult,
    inputs: dict[str, SeriesInput],
    provenance: Provenance,
    folder: Path,
    numbers: ResultsConfig,
) -> list[Written]:
    """Every object ``result`` calls for, written into ``folder``: a SEG when there are
    masks, an SR when there is anything to report (a statement of absence included), a
    heat-map SC per heat map. The SEG's source is the input the masks are on; the other
    inputs (an MR study's other sequences) are its further sources. Each result's series is
    numbered and described after its source series (:func:`result_series_number`,
    :meth:`Provenance.series_description`), so the results of two series of one study can
    be told apart."""
    primary = result.masks[0].source if result.masks else next(iter(inputs))
    source = inputs[primary].datasets()[0]
    objects: list[tuple[str, Dataset]] = []
    seg = None
    if result.masks:
        further = [name for name in inputs if name != primary]
        seg = segmentation(
            result,
            inputs,
            provenance,
            series_number=result_series_number(source, "SEG", numbers.seg_series_number),
            further_sources=further,
            omit_empty_frames=numbers.seg_omit_empty_frames,
        )
        objects.append(("SEG", seg))
    if result.findings or result.masks or result.classifications or result.looked_for:
        sr = measurement_report(
            result,
            inputs,
            provenance,
            series_number=result_series_number(source, "SR", numbers.sr_series_number),
            segmentation=seg,
            source=primary,
        )
        objects.append(("SR", sr))
    if result.heatmaps:
        reference = inputs[result.heatmaps[0].source].datasets()[0]
        number = result_series_number(reference, "SC", numbers.sc_series_number)
        sc = heat_map_capture(result, inputs, provenance, series_number=number)
        objects.append(("SC", sc))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, dataset in objects:
        path = folder / f"{kind.lower()}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append(
            Written(
                kind,
                path,
                str(dataset.SOPClassUID),
                str(dataset.SOPInstanceUID),
                str(dataset.SeriesInstanceUID),
                str(dataset.StudyInstanceUID),
            )
        )
    return written
