"""Pneumonia classification with a Grad-CAM heat map on a chest radiograph.

Settings (``algorithms: {pneumonia-cxr: {...}}`` in the node configuration) are
:class:`Settings`: ``weights``, ``variant``, ``allow_pickle``; any other key is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

from pydantic import Field

from dicom_node.algorithm import (
    SERIES_INPUT,
    AlgorithmResult,
    AlgorithmSettings,
    Classification,
    Concept,
    HeatMap,
    InputError,
    InputSpec,
    QaCase,
    QaPhantom,
    SeriesInput,
    TrainedAlgorithm,
    Weights,
)
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.pt")
LABEL = "Pneumonia"
PNEUMONIA = Concept("SCT", "233604007", "Pneumonia")

# `dicom-node qa`'s phantom: a PA chest radiograph with an opacity, which the demo weights
# call pneumonia in the project's tests.
CXR_SPEC = CxrPhantomSpec(
    rows=400, columns=520, opacity=True, seed=500_001, patient_id="DICOMNODE-QA-CXR"
)


def qa_phantom(folder: Path) -> QaPhantom:
    """The QA radiograph written into ``folder``, and whether it shows pneumonia."""
    path = folder / "CR0001.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    cxr_dataset(CXR_SPEC).save_as(path, enforce_file_format=True)
    return QaPhantom({SERIES_INPUT: (path,)}, classifications={PNEUMONIA: CXR_SPEC.opacity})


# torch and torchxrayvision are imported in load(), not here: discovering and routing to the
# algorithm (in the SCP's process) must not pay for them.


class Settings(AlgorithmSettings):
    """``algorithms.pneumonia-cxr``: public weights and whose operating threshold applies."""

    weights: Path | None = Field(
        None,
        description="A torchxrayvision DenseNet-121 weights file (a state dict, or with "
        "allow_pickle the pickled model xrv publishes); without it, the demo weights.",
    )
    variant: Literal["rsna", "all"] = Field(
        "rsna", description="Whose Pneumonia operating threshold applies (xrv's model table)."
    )
    allow_pickle: bool = Field(
        False,
        description="Read a pickled model (code runs as it loads: only a file you trust).",
    )


class PneumoniaCxr(TrainedAlgorithm):
    name = "pneumonia-cxr"
    version = "1.0.0"
    inputs = InputSpec()
    qa_case = QaCase("CXR", frozenset({"SR", "SC"}), qa_phantom)
    demo_weights = DEMO_WEIGHTS
    model_module = "dicom_node_algorithms.pneumonia_cxr.model"
    settings_model: ClassVar[type[AlgorithmSettings] | None] = Settings
    settings: Settings

    def public_weights(self) -> Weights | None:
        if self.settings.weights is None:
            return None
        return Weights.from_file(self.settings.weights, demo=False)

    def load_public(self, model: ModuleType) -> Any:
        return model.load_network(
            self.settings.weights,
            variant=self.settings.variant,
            allow_pickle=self.settings.allow_pickle,
        )

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        import torch

        from dicom_node.display import displayed_image
        from dicom_node_algorithms.pneumonia_cxr.model import network_input, probability_and_cam

        series = inputs["series"]
        if len(series.paths) != 1:
            raise InputError(f"expected one radiograph, the series holds {len(series.paths)}")
        (dataset,) = series.datasets()
        x, geometry = network_input(displayed_image(dataset))
        x = x.to(self.device)
        with torch.autocast(device_type="cuda", enabled=self.device.startswith("cuda")):
            probability, cam = probability_and_cam(self.loaded, x)
        result = AlgorithmResult()
        result.classifications.append(
            Classification(LABEL, probability, self.loaded.threshold, finding=PNEUMONIA)
        )
        result.heatmaps.append(HeatMap(f"{LABEL} Grad-CAM", geometry.to_source(cam)))
        return result
