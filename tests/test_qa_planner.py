"""qa's planner without a node: it decides on the node's own reading of a series (facts.py),
so the two agree where a reading of qa's own once did not (mixed planes, slice counts); the
installed algorithms' self-tests are what it tests, and one without is a SKIP, not a failure."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.algorithm import SERIES_INPUT, QaCase, QaPhantom
from dicom_node.config import NodeConfig
from dicom_node.errors import QaUnusable
from dicom_node.facts import describe_series
from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.plugins import discover
from dicom_node.qa.peer import QA_AE_TITLE
from dicom_node.qa.phantom import Phantom, self_tests
from dicom_node.qa.planner import plan, select_algorithms

pytestmark = pytest.mark.unit

LUNG = "lung-nodules-ct"  # its default rule: axial CT, at least 20 slices


def localizer_left_in(paths: list[Path]) -> None:
    """The first image becomes a sagittal one: a localizer in an axial series."""
    ds = dcmread(paths[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(paths[0])


def last_without_pixels(paths: list[Path]) -> None:
    """The last instance keeps its header but loses its pixels: an instance, not a slice."""
    ds = dcmread(paths[-1])
    del ds.PixelData
    ds.save_as(paths[-1])


@pytest.mark.parametrize(
    ("instances", "change", "expected", "reason"),
    [
        (24, localizer_left_in, ("oblique", 24), "orientation oblique is not axial"),
        (20, last_without_pixels, ("axial", 19), "19 slices, fewer than 20"),
    ],
)
def test_qa_plans_on_the_facts_the_node_reads(
    tmp_path: Path, instances: int, change, expected: tuple[str, int], reason: str
) -> None:
    def make(folder: Path) -> QaPhantom:
        paths = write_ct_series(folder, CtPhantomSpec(slices=instances, rows=8, columns=8))
        change(paths)
        return QaPhantom({SERIES_INPUT: tuple(paths)})

    phantom = Phantom.make(LUNG, QaCase("CT", frozenset({"SEG", "SR"}), make), tmp_path)
    decided = plan(phantom, NodeConfig(), frozenset({LUNG}), QA_AE_TITLE)
    read = describe_series(phantom.series[SERIES_INPUT], calling_aets=frozenset({QA_AE_TITLE}))
    assert decided.facts == (read,)
    assert (read.orientation, read.slices, read.instances) == (*expected, instances)
    assert not decided.routes
    assert decided.why_not is not None and reason in decided.why_not


def test_an_algorithm_without_a_self_test_is_skipped_not_failed() -> None:
    config = NodeConfig.model_validate(
        {
            "routing": {
                "rules": [
                    {"algorithm": name, "series": {"modality": ["CT"]}}
                    for name in ("tested", "untested")
                ]
            }
        }
    )
    case = QaCase("CT", frozenset({"SR"}), lambda folder: QaPhantom({SERIES_INPUT: ()}))
    installed = frozenset({"tested", "untested", "unrouted"})
    chosen, skipped = select_algorithms(config, installed, {"tested": case}, None)
    assert chosen == ["tested"]
    ((study, name, outcome, detail),) = [astuple(check) for check in skipped]
    assert (study, name, outcome) == ("untested", "selected", "SKIP")
    assert "no self-test" in detail
    with pytest.raises(QaUnusable, match="no phantom for untested; qa tests tested"):
        select_algorithms(config, installed, {"tested": case}, ["untested"])


def test_the_built_in_algorithms_declare_their_self_tests() -> None:
    cases = self_tests(discover())
    built_in = {"brain-tumour-mr": "MR", "lung-nodules-ct": "CT", "pneumonia-cxr": "CXR"}
    assert {name: cases[name].label for name in built_in} == built_in
    assert cases["pneumonia-cxr"].results == {"SR", "SC"}  # no SEG of a classification


def test_a_qa_case_names_only_objects_the_node_writes() -> None:
    with pytest.raises(ValueError, match="results among"):
        QaCase("CT", frozenset({"PDF"}), lambda folder: QaPhantom({SERIES_INPUT: ()}))
