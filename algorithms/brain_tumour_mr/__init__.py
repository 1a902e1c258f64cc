"""Brain tumour segmentation on four-sequence MR: tumour core, whole and enhancing tumour.

Settings (``algorithms: {brain-tumour-mr: {...}}``): ``bundle``, a MONAI bundle folder as the
Model Zoo publishes ``brats_mri_segmentation`` (``configs/inference.json`` and
``models/model.pt`` or ``model.ts``); without it the demo weights. The public weights were
trained on BraTS volumes resampled to 1 mm; the node runs on the T1c series' own grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dicom_node.algorithm import (
    Algorithm,
    AlgorithmResult,
    InputSpec,
    LabelMask,
    SeriesInput,
    Weights,
)

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.pt")


class BrainTumourMr(Algorithm):
    name = "brain-tumour-mr"
    version = "1.0.0"
    inputs = InputSpec(("T1c", "T1", "T2", "FLAIR"))

    def weights(self) -> Weights:
        if "bundle" in self.settings:
            return Weights.from_bundle(Path(self.settings["bundle"]))
        return Weights.from_file(DEMO_WEIGHTS, demo=True)

    def load(self, device: str) -> None:
        # torch and MONAI load here, not at import: routing must not pay for them.
        from algorithms.brain_tumour_mr.model import load_bundle, load_demo

        weights = self.weights()
        assert weights.path is not None
        self.loaded = (
            load_demo(weights.path) if weights.demo else load_bundle(Path(self.settings["bundle"]))
        )
        self.loaded.network.to(device)

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        from algorithms.brain_tumour_mr.model import (
            REGIONS,
            network_input,
            segment,
            to_source_grid,
        )

        volumes = {role: series.volume() for role, series in inputs.items()}
        image, reference = network_input(volumes)
        masks = segment(self.loaded, image)
        result = AlgorithmResult(self.name, self.version, demo=self.loaded.demo)
        voxel_ml = float(volumes["T1c"].voxel_volume) / 1000.0
        for region, mask in zip(REGIONS, masks, strict=True):
            source = to_source_grid(mask, reference, volumes["T1c"])
            result.masks.append(LabelMask(region, source, source="T1c"))
            result.measurements[f"{region} volume_ml"] = round(float(source.sum()) * voxel_ml, 3)
        return result
