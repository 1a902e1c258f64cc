"""Lung nodule detection on chest CT: nodule centres, sizes, scores and outlines.

Settings (``algorithms: {lung-nodules-ct: {...}}``) are :class:`Settings`: ``bundle``,
``report_threshold``, ``enclosed_only``, ``prior_max_age_days``; any other key is refused.

Follow-up: when the node hands over the patient's prior chest CT as the input ``prior``, the
nodules are found on it too, the two scans are registered rigidly and each nodule is matched
to its prior (:mod:`dicom_node.followup`); the result's ``followup`` says what became of each.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field, StrictBool

from dicom_node.algorithm import (
    SERIES_INPUT,
    AlgorithmResult,
    AlgorithmSettings,
    BundleAlgorithm,
    BundleSettings,
    Concept,
    Finding,
    FollowUp,
    InputSpec,
    LabelMask,
    PriorSpec,
    QaCase,
    QaLesion,
    QaPhantom,
    SeriesInput,
)
from dicom_node.phantoms import CtPhantomSpec, Nodule, write_ct_series

if TYPE_CHECKING:
    from dicom_node.followup import Lesion
    from dicom_node_algorithms.lung_nodules_ct.model import FoundNodule

log = logging.getLogger(__name__)

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.pt")
LABEL = "Nodule"
NODULE = Concept("SCT", "27925004", "Nodule")
LUNG = Concept("SCT", "39607008", "Lung")

# `dicom-node qa`'s phantom: the chest CT with one solid 9 mm nodule that the project's tests
# run the demo weights on, so what qa expects of it is what those tests establish.
CT_SPEC = CtPhantomSpec(
    slices=40,
    rows=128,
    columns=128,
    pixel_spacing_mm=(0.75, 0.75),
    noise_hu=20,
    nodules=(Nodule((-27.0, 4.0, 24.0), 9.0),),
    patient_id="DICOMNODE-QA-CT",
)


def qa_phantom(folder: Path) -> QaPhantom:
    """The QA chest CT written into ``folder`` (slices in acquisition order), with where its
    nodules are."""
    paths = write_ct_series(folder, CT_SPEC)
    lesions = tuple(
        QaLesion(
            NODULE,
            nodule.center_lps_mm,
            nodule.diameter_mm,
            np.stack([CT_SPEC.nodule_disc(nodule, k) for k in range(CT_SPEC.slices)]),
        )
        for nodule in CT_SPEC.nodules
    )
    return QaPhantom({SERIES_INPUT: tuple(paths)}, lesions=lesions)


class Settings(BundleSettings):
    """``algorithms.lung-nodules-ct``: the weights and which boxes are reported."""

    # bundle: the Model Zoo's lung_nodule_ct_detection (BundleSettings); without it the demo.
    report_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="The score from which a box is reported as a nodule. The bundle's own "
        "selector keeps boxes down to 0.02, candidates for FROC analysis rather than findings "
        "for a reader.",
    )
    enclosed_only: StrictBool | None = Field(
        None,
        description="Report only nodules surrounded by lung; left out, true with the demo "
        "weights and false with a bundle. The demo network, trained on phantoms, boxes pieces "
        "of the heart, chest wall and vessels on a real CT; the rule removes those, and with "
        "them the nodules that touch the pleura or a vessel, which a trained model must be "
        "allowed to report.",
    )
    prior_max_age_days: int = Field(
        3 * 365,
        ge=1,
        description="Follow-up: the oldest prior chest CT of the patient (in days before the "
        "current study) that the node hands over for comparison; the most recent qualifying "
        "prior on the node is taken.",
    )


class LungNodulesCt(BundleAlgorithm):
    name = "lung-nodules-ct"
    version = "1.0.0"
    demo_weights = DEMO_WEIGHTS
    model_module = "dicom_node_algorithms.lung_nodules_ct.model"
    inputs = InputSpec(prior=PriorSpec())
    qa_case = QaCase("CT", frozenset({"SEG", "SR"}), qa_phantom)
    settings_model: ClassVar[type[AlgorithmSettings] | None] = Settings
    settings: Settings

    @property
    def report_threshold(self) -> float:
        return self.settings.report_threshold

    @property
    def enclosed_only(self) -> bool:
        if self.settings.enclosed_only is None:
            return bool(self.loaded.demo)
        return self.settings.enclosed_only

    @classmethod
    def prior_input(cls, settings: Any) -> PriorSpec | None:
        assert cls.inputs.prior is not None
        return replace(cls.inputs.prior, max_age_days=settings.prior_max_age_days)

    def _find(self, series: SeriesInput) -> list[FoundNodule]:
        from dicom_node_algorithms.lung_nodules_ct.model import (
            detect,
            lps_affine,
            nodules,
            preprocess,
        )

        volume = series.volume()
        image = preprocess(volume, self.loaded.parameters)
        threshold = self.report_threshold
        return nodules(
            detect(self.loaded, image, min_score=threshold),
            lps_affine(image),
            volume,
            threshold=threshold,
            enclosed_only=self.enclosed_only,
        )

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        found = self._find(inputs[SERIES_INPUT])
        result = AlgorithmResult(looked_for=[NODULE])
        for number, nodule in enumerate(found, 1):
            name = f"{LABEL} {number}"
            result.masks.append(LabelMask(name, nodule.mask, property_type=NODULE, anatomy=LUNG))
            result.findings.append(
                Finding(
                    LABEL,
                    tuple(round(float(v), 2) for v in nodule.center_lps_mm),
                    tuple(round(float(v), 2) for v in nodule.size_mm),
                    round(nodule.score, 4),
                    mask=name,
                    finding_type=NODULE,
                    site=LUNG,
                )
            )
        result.measurements["nodule count"] = float(len(found))
        prior = self.inputs.prior
        if prior is not None and prior.role in inputs:
            try:
                result.followup = self._follow_up(inputs[SERIES_INPUT], found, inputs[prior.role])
            except (ValueError, RuntimeError) as exc:
                # A prior that cannot be compared (not one regular volume, no date, a
                # registration that does not converge) must not cost the current study its
                # read: the result is reported as without a prior, and the log says why.
                log.warning("follow-up left out: %s: %s", type(exc).__name__, exc)
        return result

    def _follow_up(
        self, current: SeriesInput, found: list[FoundNodule], prior: SeriesInput
    ) -> FollowUp:
        """The nodules of the prior study, found as on the current one, matched to the current
        ones after registering the two scans."""
        from dicom_node import followup

        assert self.inputs.prior is not None
        days = followup.interval_days(prior.datasets()[0], current.datasets()[0])
        before = self._find(prior)
        transform = followup.register_rigid(current.volume(), prior.volume())
        changes = followup.compare(
            [_lesion(n, current) for n in found],
            [_lesion(n, prior) for n in before],
            transform,
            days,
        )
        return FollowUp(
            self.inputs.prior.role,
            days,
            tuple(changes),
            tuple(float(v) for v in transform.matrix.ravel()),
        )


def _lesion(nodule: FoundNodule, series: SeriesInput) -> Lesion:
    """A found nodule as follow-up compares it: the diameter the SR reports (the box's longest
    edge) and the volume of its outline."""
    from dicom_node.followup import Lesion

    x, y, z = (round(float(v), 2) for v in nodule.center_lps_mm)
    volume = float(nodule.mask.sum()) * float(series.volume().voxel_volume)
    return Lesion((x, y, z), round(float(max(nodule.size_mm)), 2), volume)
