"""Plugin discovery: which algorithms are installed, and what each one is.

Algorithms register under the Python entry-point group :data:`ENTRY_POINT_GROUP`; the node
finds them through :mod:`importlib.metadata` and never imports one by name. A plugin that
fails to load is listed with its reason instead of stopping the node.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from dicom_node.algorithm import Algorithm, AlgorithmSettings
from dicom_node.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.algorithms"


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when PyTorch sees a GPU, else ``cpu``; others pass through."""
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Registration:
    """One entry point of the group: the class it names, or why it could not be loaded."""

    name: str
    target: str  # "module:Class"
    algorithm: type[Algorithm] | None
    error: str | None


def discover() -> dict[str, Registration]:
    """Every algorithm registered through entry points; broken ones say why, never raise."""
    return {ep.name: register(ep) for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register(ep: EntryPoint) -> Registration:
    """The class ``ep`` names, checked against the plugin contract, or why it is broken."""
    try:
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"{ep.value} is not a dicom_node.algorithm.Algorithm subclass")
        if cls.name != ep.name:
            raise ValueError(f"entry point {ep.name!r} names a class called {cls.name!r}")
        model = cls.settings_model
        if model is not None and not (
            isinstance(model, type) and issubclass(model, AlgorithmSettings)
        ):
            # Any other model might take unknown keys: a misspelt setting would go unnoticed.
            raise TypeError(
                f"{ep.value}.settings_model is not a dicom_node.algorithm.AlgorithmSettings"
            )
        return Registration(ep.name, ep.value, cls, None)
    except Exception as exc:  # a broken plugin must not stop the node; it is listed
        log.error("algorithm entry point %s = %s is broken: %s", ep.name, ep.value, exc)
        return Registration(ep.name, ep.value, None, f"{type(exc).__name__}: {exc}")


def catalogue(
    registry: Mapping[str, Registration], settings: Mapping[str, Mapping[str, Any]], device: str
) -> list[dict[str, Any]]:
    """What each installed algorithm is, as plain data: for ``dicom-node algorithms`` and for
    the worker's record that the dashboard shows. A broken one says why; the rest are listed."""
    rows = []
    for name, registration in sorted(registry.items()):
        row: dict[str, Any] = {"name": name, "entry_point": registration.target, "device": device}
        if registration.algorithm is None:
            row["error"] = registration.error
        else:
            cls = registration.algorithm
            row["version"] = cls.version
            row["inputs"] = list(cls.inputs.roles)
            try:
                weights = cls(settings.get(name)).weights()
                row["weights"] = weights.describe()
                row["demo"] = weights.demo
            except Exception as exc:  # bad settings for one algorithm: say so, list the rest
                row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def check_settings(
    registry: Mapping[str, Registration], settings: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raise :class:`ConfigError` for the first ``algorithms.<name>`` section that names no
    installed algorithm or that its algorithm refuses (``algorithms.<name>.<key>: ...``).

    For ``dicom-node config check``: a misspelt algorithm name or setting would otherwise
    leave the algorithm on its defaults, the demo weights among them. A plugin that fails to
    load cannot check its section; ``dicom-node algorithms`` reports it.
    """
    for name, section in settings.items():
        registration = registry.get(name)
        if registration is None:
            installed = ", ".join(sorted(registry)) or "none"
            raise ConfigError(f"algorithms.{name}: no such algorithm installed ({installed})")
        if registration.algorithm is not None:
            registration.algorithm.checked_settings(section)
