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
    AlgorithmResult,
    AlgorithmSettings,
    Classification,
    Concept,
    HeatMap,
    InputError,
    InputSpec,
    SeriesInput,
    TrainedAlgorithm,
    Weights,
)

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.pt")
LABEL = "Pneumonia"
PNEUMONIA = Concept("SCT", "233604007", "Pneumonia")

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
        result = AlgorithmResult(self.name, self.version, demo=self.loaded.demo)
        result.classifications.append(
            Classification(LABEL, probability, self.loaded.threshold, finding=PNEUMONIA)
        )
        result.heatmaps.append(HeatMap(f"{LABEL} Grad-CAM", geometry.to_source(cam)))
        return result
