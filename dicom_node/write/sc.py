"""Heat-map Secondary Capture (PS3.3 A.8.1): the radiograph with the heat map over it and the
finding, probability and DEMO warning burned in."""

from __future__ import annotations

import highdicom as hd
import numpy as np

from dicom_node.algorithm import DEMO_WARNING, AlgorithmResult, SeriesInput
from dicom_node.burn_in import burn_in
from dicom_node.copied import copyable
from dicom_node.display import displayed_image
from dicom_node.errors import TooSmallForText, WriteError
from dicom_node.write.provenance import MANUFACTURER, Provenance
from dicom_node.write.source import character_set


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
    # highdicom assigns a list in SCImage.__init__, so mypy types the attribute list[str];
    # DICOM's empty value (and pydicom's MultiValue) are what is set here.
    capture.PatientOrientation = reference.get("PatientOrientation") or ""  # type: ignore[assignment]
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
    from dicom_node.compat.highdicom_tables import anatomic_regions

    known = anatomic_regions().get(body_part)
    return True if known is None else bool(known[1])
