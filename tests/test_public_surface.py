"""The node's public surfaces are pinned, as httpx pins its own: the exception tree lives in one
module and every exception the node raises on purpose is in it; the writers' package and the
self-test's package export exactly what they say. A name added or dropped fails here, so that
a change to what importers may rely on is made on purpose. (The plugin API's surface is pinned
in test_algorithms.py.)"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import dicom_node
from dicom_node import errors

pytestmark = pytest.mark.unit

PACKAGE = Path(dicom_node.__file__).parent


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages([str(PACKAGE)], "dicom_node.") if "__" not in m.name
    )


def test_every_exception_class_of_the_package_is_defined_in_errors() -> None:
    """An AST scan, so that a class defined under a name the tree does not know is found too."""
    defined_elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            if any(b.endswith(("Error", "Exception")) or b in errors.__all__ for b in bases):
                defined_elsewhere.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert defined_elsewhere == []


def test_the_tree_has_one_root_and_exports_every_class() -> None:
    classes = {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert sorted(errors.__all__) == sorted(classes)
    assert all(issubclass(cls, errors.DicomNodeError) for cls in classes.values())
    for module in _modules():  # raised anywhere, the class is the tree's own
        importlib.import_module(module)
    assert {c.__module__ for c in _subclasses(errors.DicomNodeError)} == {"dicom_node.errors"}


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("ConfigError", ValueError),
        ("InputError", ValueError),
        ("WriteError", ValueError),
        ("WeightsMismatch", ValueError),
        ("TooSmallForText", ValueError),
        ("UnsendableFile", ValueError),
        ("ConformanceDocError", ValueError),
        ("AssociationFailed", ConnectionError),
    ],
)
def test_each_class_keeps_its_built_in_base(name: str, base: type) -> None:
    """``except ValueError`` (pydantic validators, argparse callers) still catches them."""
    assert issubclass(getattr(errors, name), base)


@pytest.mark.parametrize(
    ("module", "surface"),
    [
        (
            "dicom_node.write",
            [
                "Provenance",
                "WriteError",
                "Written",
                "heat_map_capture",
                "measurement_report",
                "result_series_number",
                "segmentation",
                "write_all",
            ],
        ),
        ("dicom_node.qa", ["QaOptions", "run_qa"]),
    ],
)
def test_package_surface(module: str, surface: list[str]) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == surface
    assert all(hasattr(imported, name) for name in surface)


@pytest.mark.parametrize(
    ("name", "branch"),
    [
        ("InputError", errors.InputFault),
        ("WriteError", errors.InputFault),
        ("TooSmallForText", errors.InputFault),
        ("WeightsMismatch", errors.SetupFault),
        ("ConfigError", errors.SetupFault),
        ("DestinationRefused", errors.Permanent),
        ("DestinationUnavailable", errors.Transient),
        ("OutOfResources", errors.Transient),
        ("ObjectStoreUnavailable", errors.Transient),
        ("ObjectCorrupt", errors.Transient),
        ("ObjectStoreRefused", errors.SetupFault),
        ("ObjectMissing", errors.SetupFault),
    ],
)
def test_the_tree_says_whether_trying_again_can_help(name: str, branch: type) -> None:
    """The worker and the deliverer retry by these branches: a weights file that does not fit
    is not tried three times, nor is a series an algorithm cannot use."""
    assert issubclass(getattr(errors, name), branch)


def test_no_class_is_both_permanent_and_transient() -> None:
    both = [c.__name__ for c in _subclasses(errors.Permanent) if issubclass(c, errors.Transient)]
    assert both == []
    assert errors.DeliveryError.of("x", permanent=True).permanent
    assert not errors.DeliveryError.of("x", permanent=False).permanent
