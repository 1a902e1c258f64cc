"""Brain tumour segmentation: MONAI SegResNet exactly as in the brats_mri_segmentation bundle.

Input: four co-registered channels in the order T1c, T1, T2, FLAIR, each z-scored over its
non-zero voxels (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``), in the voxel
orientation of the BraTS NIfTI files the bundle was trained on (axes towards patient left,
posterior, superior). Output: three sigmoid channels — tumour core, whole tumour, enhancing
tumour — thresholded at 0.5, sliding window 240 x 240 x 160 (the bundle's inferer).

The series come as highdicom volumes; T1, T2 and FLAIR are resampled onto the T1c grid from
their affines (trilinear), and the masks go back to the T1c series' own frame order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet
from monai.transforms import NormalizeIntensity
from scipy import ndimage

from dicom_node.weights import (
    bundle_parser,
    load_bundle_network,
    load_demo_checkpoint,
    load_state_strictly,
)

ROLES = ("T1c", "T1", "T2", "FLAIR")  # the bundle's channel order
REGIONS = ("tumour core", "whole tumour", "enhancing tumour")  # the bundle's output channels
NETWORK_ORIENTATION = "LPS"  # BraTS NIfTI voxel axes: +i left, +j posterior, +k superior
DEMO_FORMAT = "dicom-node-demo-brats-v1"


@dataclass
class LoadedNetwork:
    network: torch.nn.Module
    roi_size: tuple[int, int, int]
    overlap: float
    demo: bool


def load_bundle(bundle: Path) -> LoadedNetwork:
    """A MONAI bundle folder (configs/ + models/model.pt or model.ts), loaded strictly."""
    inferer = bundle_parser(bundle).get("inferer")
    return LoadedNetwork(
        load_bundle_network(bundle),
        tuple(inferer["roi_size"]),
        float(inferer.get("overlap", 0.25)),
        demo=False,
    )


def demo_network(architecture: dict[str, Any]) -> SegResNet:
    return SegResNet(in_channels=len(ROLES), out_channels=len(REGIONS), **architecture)


def load_demo(path: Path) -> LoadedNetwork:
    checkpoint = load_demo_checkpoint(path, DEMO_FORMAT)
    network = demo_network(json.loads(checkpoint["architecture"]))
    load_state_strictly(network, checkpoint["state_dict"], path, "the demo SegResNet")
    roi = tuple(int(v) for v in checkpoint["roi_size"])
    return LoadedNetwork(network.eval(), roi, 0.5, demo=True)


def resample_onto(source: hd.Volume, target: hd.Volume) -> np.ndarray:
    """``source`` resampled onto ``target``'s voxel grid through patient space (trilinear).

    Series acquired on one grid (the usual case within a study, and what BraTS provides)
    need no interpolation: their voxels are only reordered, exactly.
    """
    if source.frame_of_reference_uid != target.frame_of_reference_uid:
        raise ValueError("the series are in different frames of reference: not co-registered")
    try:
        return source.match_geometry(target).array.astype(np.float32)
    except RuntimeError:  # not a permutation, flip or crop of the target grid
        pass
    # target voxel -> patient -> source voxel
    mapping = source.inverse_affine @ target.affine
    return ndimage.affine_transform(
        source.array.astype(np.float32),
        mapping[:3, :3],
        offset=mapping[:3, 3],
        output_shape=target.spatial_shape,
        order=1,
        mode="constant",
        cval=0.0,
    )


def network_input(volumes: dict[str, hd.Volume]) -> tuple[torch.Tensor, hd.Volume]:
    """(1, 4, L, P, S) tensor, and the T1c volume in network orientation it is on."""
    reference = volumes["T1c"].to_patient_orientation(NETWORK_ORIENTATION)
    channels = [
        reference.array.astype(np.float32)
        if role == "T1c"
        else resample_onto(volumes[role], reference)
        for role in ROLES
    ]
    image = torch.from_numpy(np.stack(channels))
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    return torch.as_tensor(image)[None], reference


def segment(loaded: LoadedNetwork, image: torch.Tensor) -> np.ndarray:
    """Boolean masks (3, L, P, S): sigmoid > 0.5 of the sliding-window prediction."""
    inferer = SlidingWindowInferer(
        roi_size=loaded.roi_size, sw_batch_size=1, overlap=loaded.overlap
    )
    device = next(loaded.network.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        prediction = inferer(image.to(device), loaded.network)
    return (torch.sigmoid(prediction.float())[0] > 0.5).cpu().numpy()


def to_source_grid(mask: np.ndarray, reference: hd.Volume, source: hd.Volume) -> np.ndarray:
    """A mask on the network-oriented grid back in the source series' (frame, row, col) order."""
    oriented = hd.Volume(
        mask.astype(np.uint8),
        reference.affine,
        coordinate_system=reference.coordinate_system,
        frame_of_reference_uid=reference.frame_of_reference_uid,
    )
    return oriented.match_geometry(source).array.astype(bool)
