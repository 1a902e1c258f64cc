"""Loading network weights strictly: MONAI bundles, state dicts and the demo checkpoints.

For algorithm plugins. A file that does not fit the network it is meant for is a
:class:`WeightsMismatch` naming the file and what did not fit, never a partial load: weights
loaded with ``strict=False`` give plausible-looking wrong results. torch and MONAI are
imported by the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.errors import WeightsMismatch

if TYPE_CHECKING:
    import torch
    from monai.bundle.config_parser import ConfigParser

BUNDLE_MODEL_FILES = ("model.pt", "model.ts")  # what the MONAI Model Zoo publishes


def bundle_model_file(bundle: Path) -> Path:
    """``models/model.pt`` (preferred) or ``models/model.ts`` of a MONAI bundle folder."""
    for name in BUNDLE_MODEL_FILES:
        if (bundle / "models" / name).is_file():
            return bundle / "models" / name
    raise FileNotFoundError(f"{bundle}/models has neither model.pt nor model.ts")


def bundle_parser(bundle: Path, config: str = "inference.json") -> ConfigParser:
    """The bundle's configuration, read by MONAI's own parser."""
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    return parser


def bundle_network(bundle: Path) -> torch.nn.Module:
    """The untrained ``network_def`` of a bundle, built from its config by MONAI."""
    network: torch.nn.Module = bundle_parser(bundle).get_parsed_content(
        "network_def", instantiate=True
    )
    return network


def load_state_strictly(network: torch.nn.Module, state: Any, source: Path, what: str) -> None:
    """``network.load_state_dict(state, strict=True)``, or a WeightsMismatch saying why."""
    if not isinstance(state, dict):
        raise WeightsMismatch(f"{source} holds no state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsMismatch(f"{source} does not fit {what}: {exc}") from exc


def load_bundle_network(bundle: Path) -> torch.nn.Module:
    """A bundle's network with its published weights, in eval mode.

    ``model.pt`` (a state dict, or a CheckpointSaver file ``{"model": ...}`` as the bundles'
    ``checkpointloader`` reads) goes strictly into ``network_def``; ``model.ts`` is TorchScript.
    """
    import torch

    weights = bundle_model_file(bundle)
    if weights.suffix == ".ts":
        # torch.jit.load has no annotations in torch, so mypy takes it as untyped.
        scripted: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(weights), map_location="cpu"
        )
        return scripted.eval()
    network = bundle_network(bundle)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    load_state_strictly(network, state, weights, "the bundle's network_def")
    return network.eval()


def load_demo_checkpoint(path: Path, fmt: str) -> dict[str, Any]:
    """A demo checkpoint written by one of our ``train_demo`` scripts, checked by its format."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != fmt:
        raise WeightsMismatch(f"{path} is not a dicom-node demo checkpoint ({fmt})")
    return checkpoint


def save_demo_checkpoint(path: Path, fmt: str, network: torch.nn.Module, **metadata: Any) -> None:
    """Write demo weights as :func:`load_demo_checkpoint` reads them, with what a reader
    of the file needs to know (architecture, what it was trained on, held-out scores)."""
    import torch

    torch.save({"format": fmt, **metadata, "state_dict": network.state_dict()}, path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def demo_training_cli(
    doc: str, train: Callable[..., None], *, out: Path, cases: int, epochs: int
) -> None:
    """The command line every ``train_demo`` script shares: ``--out``, ``--cases``,
    ``--epochs``, defaulting to what the committed demo weights were trained with."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out, help="where to write the weights")
    parser.add_argument("--cases", type=int, default=cases, help="phantom cases to train on")
    parser.add_argument("--epochs", type=int, default=epochs)
    args = parser.parse_args()
    train(args.out, cases=args.cases, epochs=args.epochs)
