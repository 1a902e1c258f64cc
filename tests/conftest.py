"""Shared fixtures: the corpus, the model zoo, real `dicom-node serve` processes, a PKI.

Shared helpers that are not fixtures are in tests/support/; no test module imports another.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.node import NodeProcess
from tests.support.paths import CORPUS, MODEL_ZOO, PLUGINS
from tests.support.tls import make_pki

# pytester: tests/test_layout.py runs this conftest on probe tests. The real servers' session
# fixtures live beside their helpers in tests/support/.
pytest_plugins = ["pytester", "tests.support.seaweedfs"]


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared DICOM corpus is not at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def model_zoo() -> Path:
    """The published MONAI bundle configs (no weights)."""
    if not MODEL_ZOO.is_dir():
        pytest.skip(f"the shared model zoo configs are not at {MODEL_ZOO}")
    return MODEL_ZOO


@pytest.fixture
def bundle_like(tmp_path: Path, model_zoo: Path) -> Callable[[str], Path]:
    """A MONAI bundle folder shaped as the Model Zoo publishes it: the shared configs, and
    an empty models/ for the test to put weights in."""

    def make(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(model_zoo / name / "configs", folder / "configs")
        (folder / "models").mkdir()
        return folder

    return make


@pytest.fixture
def example_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example third-party package, on the path as if pip had installed it."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("dicom_node_example", None)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes with extra settings: ``make_node(assembly={"series_quiet_seconds": 1})``."""
    started: list[NodeProcess] = []

    def factory(name: str = "node", env: dict | None = None, **settings: dict) -> NodeProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        node = NodeProcess(workdir, settings, env).start()
        started.append(node)
        return node

    yield factory
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.kill()


@pytest.fixture
def node(make_node) -> NodeProcess:
    return make_node()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and the node's and a client's certificates (tests/support/tls.py)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- layers ------------------------------------------------------------------------------------
#
# Every test is marked with exactly one layer (pyproject.toml registers them): `unit` runs in
# this process on files and libraries alone; `integration` talks to real peers (a node process,
# DICOM over a socket, dcmtk, dciodvfy, Orthanc, any subprocess); `browser` drives Chromium.
# `slow` is orthogonal. `make test-fast` runs `unit and not slow`. The marks are written in the
# test modules (pytestmark, or a decorator per test where a module mixes layers) and checked
# here, so a test nobody classified, or a "unit" test that starts a node, stops the run.

LAYERS = ("unit", "integration", "browser")
NODE_FIXTURES = {"make_node", "node"}  # each starts a `dicom-node serve` process


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        layers = {mark.name for mark in item.iter_markers() if mark.name in LAYERS}
        if len(layers) != 1:
            problems.append(f"{item.nodeid}: layers {sorted(layers) or 'none'}")
        elif layers == {"unit"} and NODE_FIXTURES & set(getattr(item, "fixturenames", ())):
            problems.append(f"{item.nodeid}: marked unit but starts a node")
    if problems:
        raise pytest.UsageError(
            "each test needs exactly one of the marks " + ", ".join(LAYERS) + " (see "
            "tests/conftest.py):\n  " + "\n  ".join(problems[:50])
        )
