"""Segmentation (PS3.3 A.51) from an algorithm's label masks, one segment per mask.

Geometry is where AI nodes go wrong (shifted or flipped overlays), so it is checked rather than
assumed: masks are in the grid of the source's highdicom volume, and each source instance is
placed in that grid by its own ImagePositionPatient before highdicom pairs frames with source
images (highdicom never sorts, and an unsorted list silently misplaces frames).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.valuerep import format_number_as_ds

from dicom_node import __version__
from dicom_node.algorithm import DEMO_WARNING, AlgorithmResult, Concept, SeriesInput
from dicom_node.copied import copyable
from dicom_node.errors import WriteError
from dicom_node.write.provenance import MANUFACTURER, MODEL_NAME, Provenance
from dicom_node.write.source import character_set, code, spatially_ordered

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
        content_description=(DEMO_WARNING if provenance.weights.demo else None),
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
