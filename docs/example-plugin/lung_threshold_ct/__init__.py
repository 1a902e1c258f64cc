"""Right and left lung on chest CT by a Hounsfield-unit threshold: the worked example of
docs/authoring.md, a complete dicom-node algorithm in one package.

The lungs are the air inside the body. Voxels below ``threshold_hu`` are air (aerated lung is
about -900 to -500 HU, soft tissue above -100 HU); air connected to the edge of the slices is
outside the patient; air pockets smaller than ``min_volume_ml`` are dropped; what is left is
split into right and left lung at the body's mid-sagittal plane (patient LPS: +x is the
patient's left, PS3.3 C.7.6.2.1.1). The node writes the two masks as a DICOM Segmentation with
two segments and a TID 1500 report of their volumes.

Classical image processing, so no training and no weights (:meth:`Weights.none`), and nothing
is marked DEMO. It is an example, not a clinical tool: the trachea and main bronchi count as
lung, and bowel gas larger than ``min_volume_ml`` in the same series would too.

Settings (``algorithms: {lung-threshold-ct: {...}}`` in the node configuration) are
:class:`Settings`: ``threshold_hu`` and ``min_volume_ml``; any other key is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from dicom_node.algorithm import (
    ANATOMICAL_STRUCTURE,
    SERIES_INPUT,
    Algorithm,
    AlgorithmResult,
    AlgorithmSettings,
    Concept,
    InputError,
    InputSpec,
    LabelMask,
    SeriesInput,
    Weights,
)

# What each segment is (Segmented Property Type, PS3.3 C.8.20.2): SNOMED CT's pre-coordinated
# right and left lung structures. DICOM's CID 7151 has only "Lung" and puts the side in a
# property type modifier, which LabelMask cannot carry; one code per side keeps the SEG's
# segments and the report's groups apart for any reader.
RIGHT_LUNG = Concept("SCT", "3341006", "Right lung")
LEFT_LUNG = Concept("SCT", "44029006", "Left lung")


class Settings(AlgorithmSettings):
    """``algorithms.lung-threshold-ct``. The node validates these when the configuration is
    checked and when the worker builds the class, so a typo is one line naming the key."""

    threshold_hu: float = Field(
        -400.0, gt=-1000.0, lt=0.0, description="Voxels below it are air (HU)."
    )
    min_volume_ml: float = Field(
        20.0, ge=0.0, description="Smaller air pockets inside the body are not lung (mL)."
    )


class LungThresholdCt(Algorithm):
    """Right and left lung of one CT series, by threshold, connected components and midline."""

    name = "lung-threshold-ct"  # must equal the entry-point name in pyproject.toml
    version = "1.0.0"  # written into every SEG and SR as the algorithm's version
    inputs = InputSpec()  # one series, handed over as inputs["series"]
    settings_model: ClassVar[type[AlgorithmSettings] | None] = Settings
    settings: Settings  # what settings_model made of algorithms.lung-threshold-ct

    def weights(self) -> Weights:
        return Weights.none()

    def load(self, device: str) -> None:
        # Nothing to load and nothing to put on a GPU; scipy is imported here so that the node
        # discovering and routing to the algorithm does not pay for it.
        from scipy import ndimage

        self.ndimage = ndimage

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        series = inputs[SERIES_INPUT]
        modality = str(series.datasets()[0].get("Modality", ""))
        if modality != "CT":
            # Thresholds in HU mean nothing on other modalities; the job fails with this text.
            raise InputError(f"series {series.series_uid} is {modality or 'no modality'}, not CT")
        volume = series.volume()  # highdicom applies the rescale: values are HU
        hu = volume.array
        if hu.ndim != 3:
            raise InputError(f"series {series.series_uid} is not a single-channel volume")
        voxel_ml = float(volume.voxel_volume) / 1000.0
        lungs, body = air_inside_body(
            hu,
            self.settings.threshold_hu,
            round(self.settings.min_volume_ml / voxel_ml),
            self.ndimage,
        )
        right, left = split_at_midline(lungs, body, volume.affine, self.ndimage)
        result = AlgorithmResult()  # the node fills in who made it
        for concept, mask in ((RIGHT_LUNG, right), (LEFT_LUNG, left)):
            # In the volume's own grid (frames in highdicom's spatial order): the node maps
            # every frame back to its source image when it writes the SEG.
            result.masks.append(
                LabelMask(
                    concept.meaning, mask, property_type=concept, category=ANATOMICAL_STRUCTURE
                )
            )
            result.measurements[f"{concept.meaning.lower()} volume_ml"] = round(
                float(mask.sum()) * voxel_ml, 3
            )
        return result


def air_inside_body(
    hu: np.ndarray, threshold_hu: float, min_voxels: int, ndimage: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(air inside the body in components of at least ``min_voxels``, the body).

    ``hu`` is (frames, rows, columns). Air touching a slice's edge is outside the patient; the
    body is everything else, lungs included.
    """
    labels, _ = ndimage.label(hu < threshold_hu)  # 6-connected: diagonal leaks do not join
    edges = np.concatenate([labels[:, (0, -1), :].ravel(), labels[:, :, (0, -1)].ravel()])
    outside = np.unique(edges[edges > 0])
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_voxels, 1)
    keep[0] = False  # label 0 is everything that is not air
    keep[outside] = False
    body = ~np.isin(labels, outside)
    return keep[labels], body


def split_at_midline(
    lungs: np.ndarray, body: np.ndarray, affine: np.ndarray, ndimage: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) parts of ``lungs``, split by the sagittal plane through the body's centre.

    ``affine`` maps (frame, row, column) indices to patient LPS mm; the patient's left is +x.
    A voxel plane, not components: lungs touching at the anterior junction line stay split.
    """
    left = np.zeros_like(lungs)
    if not body.any():
        return lungs.copy(), left
    centre = np.append(ndimage.center_of_mass(body), 1.0)
    midline_x = float(affine[0] @ centre)
    rows, columns = np.indices(lungs.shape[1:])
    in_plane_x = affine[0, 1] * rows + affine[0, 2] * columns + affine[0, 3]
    for frame in range(lungs.shape[0]):  # frame by frame: no float copy of the whole volume
        left[frame] = lungs[frame] & (in_plane_x + affine[0, 0] * frame > midline_x)
    return lungs & ~left, left
