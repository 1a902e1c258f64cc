"""Train the demo weights: a small DenseNet on phantom radiographs with and without an opacity.

Reproducible (fixed seeds), CPU only, a few minutes:

    python -m algorithms.pneumonia_cxr.train_demo [--out algorithms/pneumonia_cxr/demo_weights.pt]

The images go through exactly the pre-processing the algorithm applies to DICOM (built as
DICOM data sets, both photometric interpretations, several matrix sizes), so what is learnt is
what runs. The threshold is the one that maximises balanced accuracy on a held-out set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.pneumonia_cxr import DEMO_WEIGHTS
from algorithms.pneumonia_cxr.model import (
    DEMO_FORMAT,
    demo_network,
    logits,
    network_input,
)
from dicom_node.display import displayed_image
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.weights import demo_training_cli, save_demo_checkpoint

ARCHITECTURE = {"growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16}
SIZES = ((512, 512), (448, 560), (600, 480), (384, 384))


def phantom_set(seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for seed in seeds:
        # Label, size and photometric interpretation vary independently: a label tied to the
        # matrix size would teach the network the size.
        rows, columns = SIZES[(seed // 2) % len(SIZES)]
        spec = CxrPhantomSpec(
            rows=rows,
            columns=columns,
            opacity=bool(seed % 2),
            seed=seed,
            photometric="MONOCHROME1" if (seed // 2) % 5 == 0 else "MONOCHROME2",
        )
        x, _ = network_input(displayed_image(cxr_dataset(spec)))
        images.append(x[0])
        labels.append(float(spec.opacity))
    return torch.stack(images), torch.tensor(labels)[:, None]


def best_threshold(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold of best balanced accuracy; midway between the classes when they separate."""
    negatives, positives = probabilities[labels == 0], probabilities[labels == 1]
    if negatives.max() < positives.min():
        return float((negatives.max() + positives.min()) / 2), 1.0
    candidates = np.unique(np.round(probabilities, 3))
    scored = [
        (
            ((probabilities >= t) & (labels == 1)).sum() / max(1, (labels == 1).sum())
            + ((probabilities < t) & (labels == 0)).sum() / max(1, (labels == 0).sum())
        )
        / 2
        for t in candidates
    ]
    best = int(np.argmax(scored))
    return float(candidates[best]), float(scored[best])


def train(out: Path, *, cases: int, epochs: int) -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    x_train, y_train = phantom_set(range(cases))
    x_val, y_val = phantom_set(range(100_000, 100_200))
    network = demo_network(ARCHITECTURE)
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            loss = F.binary_cross_entropy_with_logits(
                logits(network, x_train[batch])[1], y_train[batch]
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        network.eval()
        with torch.no_grad():
            probabilities = torch.sigmoid(logits(network, x_val)[1]).numpy()[:, 0]
        threshold, accuracy = best_threshold(probabilities, y_val.numpy()[:, 0])
        print(
            f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out balanced accuracy "
            f"{accuracy:.3f} at threshold {threshold:.3f}"
        )
    save_demo_checkpoint(
        out,
        DEMO_FORMAT,
        network,
        architecture=ARCHITECTURE,
        labels=["Pneumonia"],
        threshold=threshold,
        held_out_balanced_accuracy=accuracy,
        trained_on=f"{cases} dicom-node CXR phantoms (seeds 0-{cases - 1})",
    )


def main() -> None:
    demo_training_cli(__doc__, train, out=DEMO_WEIGHTS, cases=600, epochs=6)


if __name__ == "__main__":
    main()
