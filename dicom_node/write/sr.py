"""TID 1500 Measurement Report (PS3.16) of an algorithm's findings, masks and classifications,
as a Comprehensive 3D SR observed by the algorithm as a device."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.algorithm import (
    AlgorithmResult,
    Concept,
    FindingChange,
    FollowUp,
    LesionStatus,
    SeriesInput,
)
from dicom_node.copied import copyable
from dicom_node.errors import WriteError
from dicom_node.write.provenance import MANUFACTURER, Provenance
from dicom_node.write.source import character_set, code, spatially_ordered

FINDING = Concept("SCT", "404684003", "Clinical finding")  # when an algorithm names none
MILLILITER = Code("mL", "UCUM", "milliliter")  # not among pydicom's UCUM codes
IMAGING_PROCEDURE: Code = codes.SCT.ImagingProcedure
# Follow-up (see _follow_up): the Chest CAD SR's Qualitative Difference (PS3.16 TID 4108) with
# values of CID 6134 Chest Qualitative Temporal Difference Type, and New finding (CID 6002).
QUALITATIVE_DIFFERENCE: Code = codes.DCM.QualitativeDifference
DIFFERENCE = {
    LesionStatus.NEW: codes.SCT.NewFinding,
    LesionStatus.INCREASED: codes.SCT.IncreaseInSize,
    LesionStatus.DECREASED: codes.SCT.DecreaseInSize,
    LesionStatus.STABLE: codes.SCT.NoSignificantChangesInTheFinding,
}
# No DICOM, SNOMED CT or LOINC concept names the volume doubling time; a private code, as
# PS3.16 8.1 allows (its meaning says what it is).
VOLUME_DOUBLING_TIME = Code("VDT", "99DCMNODE", "Volume doubling time")
# The measurement groups a TID 1500 report holds (TID 1410, 1411 and 1501).
MeasurementGroup = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


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
    groups: list[MeasurementGroup] = []

    def tracking_uid(mask: str | None) -> str:
        # One lesion, one tracking UID: its SEG segment's, shared by its planar and volumetric
        # groups (PS3.16 TID 1410/1411) and its follow-up; OHIF merges groups by that UID into
        # one measurement and cannot show a volumetric group that has no 2D region beside it.
        number = segment_numbers.get(mask) if mask and segmentation is not None else None
        if number and segmentation is not None:
            return str(segmentation.SegmentSequence[number - 1].TrackingUID)
        return str(hd.UID())

    finding_uids = [tracking_uid(f.mask) for f in result.findings]

    def lesion(
        identifier: str,
        mask: str | None,
        finding_type: Code,
        sites: list[hd.sr.FindingSite] | None,
        region: hd.sr.ImageRegion | None,
        measurements: list[hd.sr.Measurement],
        volume_unit: Code,
        uid: str,
    ) -> None:
        number = segment_numbers.get(mask) if mask and segmentation is not None else None
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
            # A segment of the SEG, which was built on the source volume.
            assert segmentation is not None and volume is not None
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
        assert volume is not None  # built above for findings
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
            finding_uids[number - 1],
        )
    for mask in result.masks if segmentation is not None else []:
        if mask.name in outlined:
            continue
        assert volume is not None  # built above for a SEG
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
            tracking_uid(mask.name),
        )
    if result.followup is not None:
        groups += _follow_up(
            result, result.followup, inputs[result.followup.prior], finding_uids, algorithm_id
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
    for looked_for in result.looked_for:
        if looked_for not in found:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(f"no {looked_for.meaning}"),
                    finding_type=code(looked_for),
                    algorithm_id=algorithm_id,
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(code(looked_for), codes.SCT.Absent)
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
    if result.followup is not None:
        # Of another study: highdicom lists it as Pertinent Other Evidence (PS3.3 C.17.2.3),
        # the document's reference to the prior its comparisons were made with.
        evidence += copyable(inputs[result.followup.prior].datasets())
    sr = hd.sr.Comprehensive3DSR(
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
    if any(c.doubling_time_days is not None for c in (result.followup or _NO_FOLLOW_UP).changes):
        sr.CodingSchemeIdentificationSequence = [_private_coding_scheme()]
    return sr


_NO_FOLLOW_UP = FollowUp("", 1.0, ())


def _private_coding_scheme() -> Dataset:
    """The Coding Scheme Identification item of our private codes (PS3.3 C.12.1.1.2.1,
    PS3.16 8.1: a private scheme designator starts with 99 and is described here)."""
    item = Dataset()
    item.CodingSchemeDesignator = VOLUME_DOUBLING_TIME.scheme_designator
    item.CodingSchemeName = "dicom-node local codes"
    item.CodingSchemeResponsibleOrganization = "dicom-node project"
    return item


def _volumetric(
    result: AlgorithmResult,
    segmentation: hd.seg.Segmentation,
    number: int,
    volume: hd.Volume,
    identifier: str,
    finding_type: Code,
    sites: list[hd.sr.FindingSite] | None,
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


def _follow_up(
    result: AlgorithmResult,
    followup: FollowUp,
    prior: SeriesInput,
    finding_uids: list[str],
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> list[MeasurementGroup]:
    """One TID 1501 group per lesion compared with the prior study.

    A current finding's group carries the finding's own tracking identifier and UID (so a
    viewer or a reader of the SR sees one lesion), and a lesion of the prior that is gone
    (resolved) gets a group of its own. In it:

    - Qualitative Difference (DCM 111049, the Chest CAD SR's temporal comparison, TID 4108)
      with a value of CID 6134 (Increase in size, Decrease in size, No significant changes in
      the finding) or New finding (SCT 129721008, CID 6002); a resolved lesion says instead
      that the finding is Absent now, as a group of a type found nowhere does;
    - the prior's Diameter and Volume, each referencing the prior's image through the lesion's
      centre (TID 300 INFERRED FROM that image: the prior study is what was measured);
    - Volume with the derivation Fractional Change (DCM 125314), in %: 100 (V2 - V1) / V1;
    - the volume doubling time, Δt ln 2 / ln(V2/V1), in days (UCUM d), for a lesion that grew
      or shrank (negative: its halving time), Δt from the two studies' dates.
    """
    volume, datasets = spatially_ordered(prior)
    groups: list[MeasurementGroup] = []
    resolved = 0
    for change in followup.changes:
        if change.finding is not None:
            finding = result.findings[change.finding]
            identifier = f"{finding.label} {change.finding + 1}"
            uid = finding_uids[change.finding]
            finding_type, site = finding.finding_type or FINDING, finding.site
        else:
            resolved += 1
            kind = next((f for f in result.looked_for), FINDING)
            identifier = f"Resolved {kind.meaning.lower()} {resolved}"
            uid = str(hd.UID())
            finding_type, site = kind, _site(result)
        measurements = _prior_measurements(change, volume, datasets)
        if change.status is LesionStatus.RESOLVED:
            evaluation = hd.sr.QualitativeEvaluation(code(finding_type), codes.SCT.Absent)
        else:
            evaluation = hd.sr.QualitativeEvaluation(
                QUALITATIVE_DIFFERENCE, DIFFERENCE[change.status]
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(identifier, uid),
                finding_type=code(finding_type),
                finding_sites=[hd.sr.FindingSite(code(site))] if site else None,
                algorithm_id=algorithm_id,
                measurements=measurements or None,
                qualitative_evaluations=[evaluation],
            )
        )
    return groups


def _site(result: AlgorithmResult) -> Concept | None:
    """Where a resolved lesion was: where the algorithm's findings are (one site for all)."""
    sites = {f.site for f in result.findings if f.site is not None}
    return sites.pop() if len(sites) == 1 else None


def _prior_measurements(
    change: FindingChange, volume: hd.Volume, datasets: list[Dataset]
) -> list[hd.sr.Measurement]:
    """The prior's diameter and volume, measured on its image through the lesion's centre,
    then the change and the doubling time."""
    if change.prior_center_lps_mm is None:
        return []  # a new lesion: nothing was there to measure
    frame = volume.map_reference_to_indices(np.array([change.prior_center_lps_mm], float))[0][0]
    image = datasets[int(np.clip(np.rint(frame), 0, len(datasets) - 1))]
    on_prior = [hd.sr.SourceImageForMeasurement(image.SOPClassUID, image.SOPInstanceUID)]
    measurements = [
        hd.sr.Measurement(name, round(value, 2), unit, referenced_images=on_prior)
        for name, value, unit in (
            (codes.SCT.Diameter, change.prior_diameter_mm, codes.UCUM.Millimeter),
            (codes.SCT.Volume, change.prior_volume_mm3, codes.UCUM.CubicMillimeter),
        )
        if value is not None
    ]
    if change.volume_change_percent is not None:
        measurements.append(
            hd.sr.Measurement(
                codes.SCT.Volume,
                round(change.volume_change_percent, 1),
                codes.UCUM.Percent,
                derivation=codes.DCM.FractionalChange,
            )
        )
    if change.doubling_time_days is not None:
        measurements.append(
            hd.sr.Measurement(
                VOLUME_DOUBLING_TIME, round(change.doubling_time_days, 1), codes.UCUM.Day
            )
        )
    return measurements
