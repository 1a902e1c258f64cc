"""An algorithm from outside the node: a threshold segmentation (no weights).

It is what a third-party package looks like: a class, an entry point, nothing else. The tests
put this folder on the path, where its ``.dist-info`` registers the entry points.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from pydicom import dcmread

from dicom_node.algorithm import (
    ANATOMICAL_STRUCTURE,
    Algorithm,
    AlgorithmResult,
    Finding,
    InputSpec,
    LabelMask,
    SeriesInput,
    Weights,
)


class ThresholdAlgorithm(Algorithm):
    """Outlines everything above ``threshold`` (in the volume's values, HU for CT).

    ``delay_s`` makes a run take at least that long, as a large model would: the worker tests
    kill the worker in the middle of one. ``hang`` makes a run never return, as a model stuck
    in an endless loop does (the time limit tests): ``true`` every run, a string only the
    runs on a series whose Series Description is that string. It declares no
    ``settings_model``, as a plugin written before typed settings does: it gets its section
    as a dict.
    """

    name = "example-threshold"
    version = "1.0"
    inputs = InputSpec()

    def weights(self) -> Weights:
        return Weights.none()

    def load(self, device: str) -> None:
        self.threshold = float(self.settings.get("threshold", 0.0))

    def _hangs(self, series: SeriesInput) -> bool:
        hang = self.settings.get("hang", False)
        if isinstance(hang, str):
            first = dcmread(series.paths[0], stop_before_pixels=True)
            return bool(first.get("SeriesDescription") == hang)
        return bool(hang)

    def run(self, inputs: Mapping[str, SeriesInput]) -> AlgorithmResult:
        if self._hangs(inputs["series"]):
            while True:  # busy in Python, never returning: only killing the process ends it
                time.sleep(0.05)
        time.sleep(float(self.settings.get("delay_s", 0.0)))
        volume = inputs["series"].volume()
        mask = volume.array > self.threshold
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        result = AlgorithmResult()
        result.masks.append(
            LabelMask(
                "above threshold",
                mask,
                property_type=ANATOMICAL_STRUCTURE,
                category=ANATOMICAL_STRUCTURE,
            )
        )
        result.measurements["above threshold volume_ml"] = float(mask.sum()) * voxel_ml
        if mask.any():
            center = np.argwhere(mask).mean(axis=0)
            lps = volume.affine @ np.append(center, 1.0)
            result.findings.append(
                Finding("above threshold", tuple(lps[:3]), (0.0, 0.0, 0.0), 1.0, "above threshold")
            )
        return result
