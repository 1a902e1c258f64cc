"""Lung nodule detection on chest CT: nodule centres, sizes, scores and outlines.

Settings (``algorithms: {lung-nodules-ct: {...}}``):

- ``bundle``: a MONAI bundle folder as the Model Zoo publishes ``lung_nodule_ct_detection``
  (``configs/inference.json`` and ``models/model.pt`` or ``model.ts``); without it the demo
  weights.
- ``report_threshold`` (default 0.5): the score from which a box is reported as a nodule. The
  bundle's own selector keeps boxes down to 0.02, candidates for FROC analysis rather than
  findings for a reader.
- ``enclosed_only`` (default: true with the demo weights, false with a bundle): report only
  nodules surrounded by lung. The demo network, trained on phantoms, boxes pieces of the heart,
  chest wall and vessels on a real CT; the rule removes those, and with them the nodules that
  touch the pleura or a vessel, which a trained model must be allowed to report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dicom_node.algorithm import (
    AlgorithmResult,
    BundleAlgorithm,
    Concept,
    Finding,
    InputSpec,
    LabelMask,
    SeriesInput,
)

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.pt")
LABEL = "Nodule"
NODULE = Concept("SCT", "27925004", "Nodule")
LUNG = Concept("SCT", "39607008", "Lung")


class LungNodulesCt(BundleAlgorithm):
    name = "lung-nodules-ct"
    version = "1.0.0"
    demo_weights = DEMO_WEIGHTS
    model_module = "dicom_node_algorithms.lung_nodules_ct.model"
    inputs = InputSpec()

    @property
    def report_threshold(self) -> float:
        threshold = float(self.settings.get("report_threshold", 0.5))
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"report_threshold {threshold} is not in [0, 1]")
        return threshold

    @property
    def enclosed_only(self) -> bool:
        value = self.settings.get("enclosed_only", self.loaded.demo)
        if not isinstance(value, bool):
            raise ValueError(f"enclosed_only must be true or false, not {value!r}")
        return value

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        from dicom_node_algorithms.lung_nodules_ct.model import (
            detect,
            lps_affine,
            nodules,
            preprocess,
        )

        volume = inputs["series"].volume()
        image = preprocess(volume, self.loaded.parameters)
        threshold = self.report_threshold
        found = nodules(
            detect(self.loaded, image, min_score=threshold),
            lps_affine(image),
            volume,
            threshold=threshold,
            enclosed_only=self.enclosed_only,
        )
        result = AlgorithmResult(
            self.name, self.version, demo=self.loaded.demo, looked_for=[NODULE]
        )
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
        return result
