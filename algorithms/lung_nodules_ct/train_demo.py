"""Train the demo weights: a small RetinaNet (ResNet-FPN) on chest CT phantoms with nodules.

Reproducible (fixed seeds), CPU only, a few minutes:

    python -m dicom_node_algorithms.lung_nodules_ct.train_demo [--out FILE] [--cases N] [--epochs N]

The phantoms go through the algorithm's own pre-processing (highdicom volume from the DICOM
data sets, RAS, 0.703125 x 0.703125 x 1.25 mm, HU window) and the detector is trained with the
bundle's ATSS matcher and hard-negative sampler on the anchors the public weights use.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import torch

from dicom_node.phantoms import CtPhantomSpec, Nodule, ct_series
from dicom_node.weights import demo_training_cli, save_demo_checkpoint
from dicom_node_algorithms.lung_nodules_ct import DEMO_WEIGHTS
from dicom_node_algorithms.lung_nodules_ct.model import (
    DEMO_FORMAT,
    DetectorParameters,
    LoadedDetector,
    demo_network,
    detect,
    detector_for,
    lps_affine,
    nodules,
    preprocess,
)

ARCHITECTURE = {"block_inplanes": [16, 32, 64, 128], "fpn_channels": 32}


def phantom_spec(seed: int) -> CtPhantomSpec:
    """A small chest CT with one or two nodules in the lungs; pixels square or not."""
    rng = np.random.default_rng([seed, 2])
    rows, columns = 128, 128
    row_mm, column_mm = (float(v) for v in rng.uniform(0.65, 0.9, size=2).round(3))
    spec = CtPhantomSpec(
        slices=40, rows=rows, columns=columns, pixel_spacing_mm=(row_mm, column_mm)
    )
    placed: list[Nodule] = []
    for _ in range(int(rng.integers(1, 3))):
        side = rng.choice((-1, 1))
        # the lung ellipses of the phantom, in mm from the grid centre
        x = side * 0.2 * columns * column_mm + rng.uniform(-0.5, 0.5) * 0.14 * columns * column_mm
        y = rng.uniform(-0.5, 0.5) * 0.22 * rows * row_mm
        z = rng.uniform(0.3, 0.7) * spec.slices * spec.slice_thickness_mm
        nodule = Nodule((float(x), float(y), float(z)), float(rng.uniform(5, 12)))
        apart = all(
            np.linalg.norm(np.subtract(n.center_lps_mm, nodule.center_lps_mm))
            > (n.diameter_mm + nodule.diameter_mm) / 2 + 5
            for n in placed
        )
        if apart:  # separate nodules, as a reader would count them
            placed.append(nodule)
    return CtPhantomSpec(
        slices=spec.slices,
        rows=rows,
        columns=columns,
        pixel_spacing_mm=(row_mm, column_mm),
        nodules=tuple(placed),
        noise_hu=float(rng.uniform(10, 30)),
        seed=seed,
        reversed_order=seed % 2 == 1,
    )


def truth_boxes(spec: CtPhantomSpec, affine: np.ndarray, spacing: np.ndarray) -> torch.Tensor:
    """Each nodule as a box (x1, y1, z1, x2, y2, z2) in the pre-processed image's voxels."""
    inverse = np.linalg.inv(affine)
    boxes = []
    for nodule in spec.nodules:
        center = (inverse @ np.append(nodule.center_lps_mm, 1.0))[:3]
        half = nodule.diameter_mm / 2 / spacing
        boxes.append(np.concatenate([center - half, center + half]))
    return torch.tensor(np.array(boxes), dtype=torch.float32)


def case(seed: int, parameters: DetectorParameters) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(image (1, X, Y, Z), truth boxes, what evaluation needs) of one phantom."""
    spec = phantom_spec(seed)
    volume = hd.get_volume_from_series(list(ct_series(spec)))
    image = preprocess(volume, parameters)
    affine = lps_affine(image)
    boxes = truth_boxes(spec, affine, np.asarray(parameters.pixdim_mm))
    info = {"spec": spec, "affine": affine, "image": image, "volume": volume}
    return image.as_tensor(), boxes, info


def train(out: Path, *, cases: int, epochs: int) -> None:
    torch.manual_seed(0)
    parameters = DetectorParameters()
    data = [case(seed, parameters) for seed in range(cases)]
    held_out = [case(seed, parameters) for seed in range(70_000, 70_008)]
    network = demo_network(ARCHITECTURE)
    detector = detector_for(network, parameters)
    # The bundle's train.json: ATSS matching and hard-negative sampling.
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16
    )
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs * len(data))
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        detector.train()
        total = 0.0
        for index in torch.randperm(len(data), generator=generator).tolist():
            image, boxes, _ = data[index]
            target = {"box": boxes, "label": torch.zeros(len(boxes), dtype=torch.long)}
            losses = detector([image], [target])
            loss = losses[detector.cls_key] + losses[detector.box_reg_key]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        detector.eval()
        errors, false_positives = evaluate(LoadedDetector(detector, parameters, True), held_out)
        print(
            f"epoch {epoch + 1}: loss {total / len(data):.4f}, held-out centre error "
            f"max {max(errors):.2f} source voxels, false positives {false_positives}",
            flush=True,
        )
    save_demo_checkpoint(
        out,
        DEMO_FORMAT,
        network,
        architecture=json.dumps(ARCHITECTURE),
        held_out_max_centre_error_voxels=float(max(errors)),
        trained_on=f"{cases} dicom-node chest CT phantoms (seeds 0-{cases - 1})",
    )


def evaluate(
    loaded: LoadedDetector, cases: list, threshold: float = 0.5
) -> tuple[list[float], int]:
    """Per nodule the centre error of its best box in source voxels (inf if missed); the
    number of boxes at or above ``threshold`` that match no nodule."""
    errors, false_positives = [], 0
    for _, _, info in cases:
        spec: CtPhantomSpec = info["spec"]
        voxel = np.array(
            [spec.pixel_spacing_mm[1], spec.pixel_spacing_mm[0], spec.slice_thickness_mm]
        )
        found = nodules(
            detect(loaded, info["image"]), info["affine"], info["volume"], threshold=threshold
        )
        centres = [n.center_lps_mm for n in found]
        matched = set()
        for nodule in spec.nodules:
            distances = [float(np.max(np.abs(c - nodule.center_lps_mm) / voxel)) for c in centres]
            best = int(np.argmin(distances)) if distances else -1
            errors.append(distances[best] if distances else float("inf"))
            if best >= 0 and distances[best] <= 3:
                matched.add(best)
        false_positives += len(found) - len(matched)
    return errors, false_positives


def main() -> None:
    demo_training_cli(__doc__, train, out=DEMO_WEIGHTS, cases=56, epochs=12)


if __name__ == "__main__":
    main()
