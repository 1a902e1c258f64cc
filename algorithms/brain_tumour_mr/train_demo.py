"""Train the demo weights: a small SegResNet on four-sequence brain MR phantoms.

Reproducible (fixed seeds), CPU only, a few minutes:

    python -m dicom_node_algorithms.brain_tumour_mr.train_demo [--out FILE] [--cases N] [--epochs N]

The phantoms go through the algorithm's own pre-processing (highdicom volumes from DICOM data
sets, orientation, per-channel z-score), so what is learnt is what runs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import highdicom as hd
import numpy as np
import torch
from monai.losses import DiceFocalLoss

from dicom_node.algorithm import SeriesInput
from dicom_node.phantoms import BrainPhantom, BrainPhantomSpec, write_brain_study
from dicom_node.weights import demo_training_cli, save_demo_checkpoint
from dicom_node_algorithms.brain_tumour_mr import DEMO_WEIGHTS
from dicom_node_algorithms.brain_tumour_mr.model import (
    DEMO_FORMAT,
    LoadedNetwork,
    demo_network,
    network_input,
    segment,
)

ARCHITECTURE = {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}
ROI = (64, 64, 32)


def case(seed: int, folder: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(image (4, L, P, S), truth (3, L, P, S), volumes) of one phantom study."""
    phantom = write_brain_study(folder / str(seed), phantom_spec(seed))
    volumes = {
        role: SeriesInput(role, tuple(sorted((folder / str(seed) / role).glob("*.dcm")))).volume()
        for role in phantom.series
    }
    image, reference = network_input(volumes)
    truth = [
        truth_volume(phantom, mask, reference).match_geometry(reference).array
        for mask in (phantom.tumour_core, phantom.whole_tumour, phantom.enhancing_tumour)
    ]
    return image[0], torch.from_numpy(np.stack(truth).astype(np.float32)), volumes


def phantom_spec(seed: int) -> BrainPhantomSpec:
    """Square and non-square pixels, slices in either order: what the test set varies too."""
    rng = np.random.default_rng([seed, 1])
    row, column = rng.uniform(2.6, 3.4, size=2).round(2)
    return BrainPhantomSpec(
        seed=seed, spacing_mm=(3.0, float(row), float(column)), reversed_order=seed % 2 == 1
    )


def truth_volume(phantom: BrainPhantom, mask: np.ndarray, like: hd.Volume) -> hd.Volume:
    """A phantom truth mask placed in patient space by the phantom's own affine."""
    return hd.Volume(
        mask.astype(np.uint8),
        phantom.affine,
        coordinate_system=like.coordinate_system,
        frame_of_reference_uid=like.frame_of_reference_uid,
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def train(out: Path, *, cases: int, epochs: int) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        data = [case(seed, Path(scratch))[:2] for seed in range(cases)]
        held_out = [case(seed, Path(scratch)) for seed in range(50_000, 50_006)]
    network = demo_network(ARCHITECTURE)
    loss_function = DiceFocalLoss(sigmoid=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        network.train()
        total = 0.0
        for index in torch.randperm(len(data), generator=generator).tolist():
            image, truth = data[index]
            loss = loss_function(network(image[None]), truth[None])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        network.eval()
        loaded = LoadedNetwork(network, ROI, 0.5, demo=True)
        scores = np.mean(
            [
                [
                    dice(m, t.numpy() > 0.5)
                    for m, t in zip(segment(loaded, image[None]), truth, strict=True)
                ]
                for image, truth, _ in held_out
            ],
            axis=0,
        )
        print(
            f"epoch {epoch + 1}: loss {total / len(data):.4f}, held-out Dice "
            f"TC {scores[0]:.3f} WT {scores[1]:.3f} ET {scores[2]:.3f}"
        )
    save_demo_checkpoint(
        out,
        DEMO_FORMAT,
        network,
        architecture=json.dumps(ARCHITECTURE),
        roi_size=list(ROI),
        held_out_dice=[float(s) for s in scores],
        trained_on=f"{cases} dicom-node brain MR phantoms (seeds 0-{cases - 1})",
    )


def main() -> None:
    demo_training_cli(__doc__, train, out=DEMO_WEIGHTS, cases=32, epochs=8)


if __name__ == "__main__":
    main()
