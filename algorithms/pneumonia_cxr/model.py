"""Pneumonia on chest radiographs: torchxrayvision's DenseNet, its pre-processing, Grad-CAM.

Public weights are torchxrayvision's DenseNet-121 (``densenet121-res224-rsna`` or ``-all``):
18 outputs in xrv's pathology order, Pneumonia at the index xrv's model table gives, with that
table's operating threshold. Demo weights are a small DenseNet of the same family trained by
``train_demo.py`` on the project's phantoms, with one output (Pneumonia).

Pre-processing follows torchxrayvision: the image as displayed (modality LUT, VOI, MONOCHROME1
inverted), scaled to [-1024, 1024], centre-cropped to a square and resized to 224 x 224.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchxrayvision as xrv

from dicom_node.errors import WeightsMismatch
from dicom_node.weights import load_demo_checkpoint, load_state_strictly
from dicom_node_algorithms.pneumonia_cxr import LABEL

RESOLUTION = 224
DEMO_FORMAT = "dicom-node-demo-cxr-v1"
PUBLIC_VARIANTS = ("rsna", "all")


@dataclass(frozen=True)
class CropGeometry:
    """Where the 224 x 224 network input came from in the source pixel grid."""

    rows: int
    columns: int
    top: int
    left: int
    side: int

    def to_source(self, grid: np.ndarray) -> np.ndarray:
        """Map a map on the network grid back onto the source pixels (zero outside the crop)."""
        tensor = torch.as_tensor(grid, dtype=torch.float32)[None, None]
        square = F.interpolate(tensor, size=(self.side, self.side), mode="bilinear")[0, 0]
        full = np.zeros((self.rows, self.columns), dtype=np.float32)
        full[self.top : self.top + self.side, self.left : self.left + self.side] = square.numpy()
        return full


def network_input(image: np.ndarray) -> tuple[torch.Tensor, CropGeometry]:
    """torchxrayvision's pre-processing: [-1024, 1024], centre crop, 224 x 224."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise ValueError("the radiograph is blank (a single pixel value)")
    scaled = xrv.utils.normalize((image - low) / (high - low) * 255.0, 255)
    rows, columns = scaled.shape
    side = min(rows, columns)
    top, left = (rows - side) // 2, (columns - side) // 2
    cropped = scaled[None, top : top + side, left : left + side]
    resized = xrv.datasets.XRayResizer(RESOLUTION, engine="cv2")(cropped)
    tensor = torch.from_numpy(np.ascontiguousarray(resized, dtype=np.float32))[None]
    return tensor, CropGeometry(rows, columns, top, left, side)


@dataclass
class LoadedNetwork:
    network: xrv.models.DenseNet
    index: int  # of the Pneumonia output
    threshold: float  # operating point on the sigmoid output
    demo: bool


def public_network(variant: str) -> tuple[xrv.models.DenseNet, int, float]:
    """An untrained xrv DenseNet-121 and the Pneumonia index and threshold of ``variant``."""
    if variant not in PUBLIC_VARIANTS:
        raise ValueError(f"variant must be one of {PUBLIC_VARIANTS}, not {variant!r}")
    table = xrv.models.model_urls[f"densenet121-res224-{variant}"]
    index = table["labels"].index(LABEL)
    return xrv.models.DenseNet(weights=None), index, float(table["op_threshs"][index])


def _state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        saved: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not allow_pickle:
            raise WeightsMismatch(
                f"{path} is not a plain state dict ({type(exc).__name__}); torchxrayvision's "
                "published files are pickled models: set allow_pickle: true for a file you trust"
            ) from exc
        saved = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(saved, torch.nn.Module):
        saved = saved.state_dict()
    if isinstance(saved, dict) and "state_dict" in saved:
        saved = saved["state_dict"]
    if not isinstance(saved, dict):
        return saved  # load_state_strictly says what is wrong with it
    # xrv keeps its operating points in a buffer; ours come from its model table.
    return {k: v for k, v in saved.items() if k != "op_threshs"}


def load_network(path: Path, *, variant: str, allow_pickle: bool) -> LoadedNetwork:
    """Public weights into xrv's DenseNet-121, strictly: any mismatch is an error."""
    network, index, threshold = public_network(variant)
    state = _state_dict(path, allow_pickle)
    load_state_strictly(network, state, path, "torchxrayvision's DenseNet-121")
    return LoadedNetwork(network.eval(), index, threshold, demo=False)


def demo_network(architecture: dict[str, Any]) -> xrv.models.DenseNet:
    return xrv.models.DenseNet(num_classes=1, **architecture)


def load_demo(path: Path) -> LoadedNetwork:
    checkpoint = load_demo_checkpoint(path, DEMO_FORMAT)
    network = demo_network(checkpoint["architecture"])
    load_state_strictly(network, checkpoint["state_dict"], path, "the demo DenseNet")
    return LoadedNetwork(network.eval(), 0, float(checkpoint["threshold"]), demo=True)


def logits(network: xrv.models.DenseNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature maps, classifier logits): xrv's forward without its operating-point rescaling."""
    features = network.features(x)
    pooled = F.adaptive_avg_pool2d(F.relu(features), (1, 1)).flatten(1)
    return features, network.classifier(pooled)


def probability_and_cam(loaded: LoadedNetwork, x: torch.Tensor) -> tuple[float, np.ndarray]:
    """Sigmoid probability of Pneumonia and its Grad-CAM on the network grid, in [0, 1]."""
    with torch.enable_grad():
        features, out = logits(loaded.network, x)
        score = out[0, loaded.index]
        (gradient,) = torch.autograd.grad(score, features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear")[0, 0].detach().float()
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else cam
    return float(torch.sigmoid(score.detach().float())), cam.cpu().numpy()
