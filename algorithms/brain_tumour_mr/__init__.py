"""Brain tumour segmentation on four-sequence MR: tumour core, whole and enhancing tumour.

Settings (``algorithms: {brain-tumour-mr: {...}}``, :class:`BundleSettings`, no other key):
``bundle``, a MONAI bundle folder as the Model Zoo publishes ``brats_mri_segmentation``
(``configs/inference.json`` and ``models/model.pt`` or ``model.ts``); without it the demo
weights. The public weights were
trained on BraTS volumes resampled to 1 mm; the node runs on the T1c series' own grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dicom_node.algorithm import (
    AlgorithmResult,
    BundleAlgorithm,
    Concept,
    InputSpec,
    LabelMask,
    QaCase,
    QaPhantom,
    QaRegion,
    SeriesInput,
)
from dicom_node.phantoms import BrainPhantomSpec, write_brain_study

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.pt")
BRAIN = Concept("SCT", "12738006", "Brain")
# What each output channel is (DICOM CID 7151 / 7169 concepts).
REGION_TYPES = {
    "tumour core": Concept("SCT", "108369006", "Neoplasm"),
    "whole tumour": Concept("SCT", "301766008", "Lesion of brain"),
    "enhancing tumour": Concept("NCIt", "C113842", "Enhancing Lesion"),
}

# `dicom-node qa`'s phantom: a four-sequence brain MR with a ring-enhancing tumour that the
# project's tests run the demo weights on, so what qa expects of it is what they establish.
MR_SPEC = BrainPhantomSpec(seed=900_000, patient_id="DICOMNODE-QA-MR")


def qa_phantom(folder: Path) -> QaPhantom:
    """The QA brain MR written into ``folder/<role>/`` (slices feet to head, the truth's frame
    order), with its tumour regions; the SR's whole-tumour volume is checked too."""
    brain = write_brain_study(folder, MR_SPEC)
    truth = {
        "tumour core": brain.tumour_core,
        "whole tumour": brain.whole_tumour,
        "enhancing tumour": brain.enhancing_tumour,
    }
    return QaPhantom(
        {role: tuple(sorted((folder / role).glob("MR*.dcm"))) for role in brain.series},
        primary="T1c",
        regions=tuple(
            QaRegion(name, REGION_TYPES[name], mask, volume=name == "whole tumour")
            for name, mask in truth.items()
        ),
    )


class BrainTumourMr(BundleAlgorithm):
    name = "brain-tumour-mr"
    version = "1.0.0"
    demo_weights = DEMO_WEIGHTS
    model_module = "dicom_node_algorithms.brain_tumour_mr.model"
    inputs = InputSpec(("T1c", "T1", "T2", "FLAIR"))
    qa_case = QaCase("MR", frozenset({"SEG", "SR"}), qa_phantom)

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        from dicom_node_algorithms.brain_tumour_mr.model import (
            REGIONS,
            network_input,
            segment,
            to_source_grid,
        )

        volumes = {role: series.volume() for role, series in inputs.items()}
        image, reference = network_input(volumes)
        masks = segment(self.loaded, image)
        result = AlgorithmResult()
        voxel_ml = float(volumes["T1c"].voxel_volume) / 1000.0
        for region, mask in zip(REGIONS, masks, strict=True):
            source = to_source_grid(mask, reference, volumes["T1c"])
            result.masks.append(
                LabelMask(
                    region,
                    source,
                    source="T1c",
                    property_type=REGION_TYPES[region],
                    anatomy=BRAIN,
                )
            )
            result.measurements[f"{region} volume_ml"] = round(float(source.sum()) * voxel_ml, 3)
        return result
