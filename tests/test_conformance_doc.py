"""docs/conformance.md's generated tables say what the code does.

The tables are rendered by dicom_node/conformance.py; these tests fail when the document and
the renderer differ, and when the renderer differs from what the node really does: the
contexts its Storage SCP's AE supports, and the objects dicom_node/write/ creates.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.algorithm import AlgorithmResult, Classification, HeatMap, SeriesInput
from dicom_node.assembly import Assembler
from dicom_node.config import AssemblyConfig, ResultsConfig, ScpConfig
from dicom_node.conformance import CREATED_OBJECTS, REGENERATE, TABLES, regions_of, rewrite
from dicom_node.errors import ConformanceDocError
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.scp import StorageSCP
from dicom_node.store import InstanceStore
from dicom_node.write import write_all

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
UID_CELL = re.compile(r"`(\d+(?:\.\d+)+)`")


def test_generated_tables_match_the_code() -> None:
    text = DOC.read_text()
    found = regions_of(text)
    assert found.keys() == TABLES.keys(), f"generated regions differ; run: {REGENERATE}"
    expected = rewrite(text)
    diff = "\n".join(
        difflib.unified_diff(
            text.splitlines(), expected.splitlines(), "docs", "code", n=1, lineterm=""
        )
    )
    assert text == expected, f"docs/conformance.md is out of date; run: {REGENERATE}\n{diff}"


def test_every_row_is_named_and_explained() -> None:
    for name, table in TABLES.items():
        for line in table().splitlines():
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            uid = UID_CELL.fullmatch(cells[1]) if len(cells) > 1 else None
            if uid:  # a UID no registry names would be listed as its own name
                assert cells[0] != uid[1], f"{name}: no name for {uid[1]}"
            if name == "scp-transfer-syntaxes" and cells[0].isdigit():
                assert cells[3], f"no note for transfer syntax {cells[2]}"


def test_rewrite_refuses_a_document_without_its_markers() -> None:
    text = DOC.read_text()
    broken = text.replace("<!-- generated: scu-sop-classes -->", "", 1)
    try:
        rewrite(broken)
    except ConformanceDocError as exc:
        assert "scu-sop-classes" in str(exc)
    else:
        raise AssertionError("a missing marker went unnoticed")


def _doc_region_uids(name: str) -> list[str]:
    """The UIDs of a generated region's first UID column, as the document lists them."""
    uids = []
    for line in regions_of(DOC.read_text())[name].splitlines():
        match = UID_CELL.search(line)
        if line.startswith("|") and match:
            uids.append(match[1])
    return uids


def test_the_doc_lists_exactly_what_the_scp_accepts(tmp_path: Path) -> None:
    """The AE the listener runs (built as StorageSCP builds it, not started) against the
    document: every abstract syntax it supports is listed, nothing else, and every context
    takes the transfer syntaxes of Table 4.2-1 in that order."""
    store = InstanceStore.open(tmp_path / "data")
    try:
        scp = StorageSCP(ScpConfig(), store, Assembler(store.db, AssemblyConfig()))
        contexts = scp.ae.supported_contexts
    finally:
        store.close()
    supported = {str(cx.abstract_syntax) for cx in contexts}
    listed = _doc_region_uids("scp-sop-classes") + _doc_region_uids("scp-storage-sop-classes")
    assert len(listed) == len(set(listed))
    assert set(listed) == supported
    syntaxes = _doc_region_uids("scp-transfer-syntaxes")
    for cx in contexts:
        assert [str(ts) for ts in cx.transfer_syntax] == syntaxes, cx.abstract_syntax
        assert cx.scp_role is None and cx.scu_role is None  # no role selection (§ 4.2.1.2)


def test_the_doc_lists_what_delivery_sends(tmp_path: Path) -> None:
    """Objects written by write_all, every kind, against CREATED_OBJECTS and the document:
    DELIVERY proposes each file's own SOP class and stored transfer syntax."""
    from tests.support.cases import PROVENANCE, ct_case

    _, _, series, ct_result = ct_case(tmp_path, "axial")
    cxr = tmp_path / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=64, columns=64)).save_as(cxr, enforce_file_format=True)
    cxr_result = AlgorithmResult(
        "test-heat",
        "1",
        demo=True,
        classifications=[Classification("Pneumonia", 0.8, 0.5)],
        heatmaps=[HeatMap("Grad-CAM", np.full((64, 64), 0.5))],
    )
    written = [
        *write_all(ct_result, {"series": series}, PROVENANCE, tmp_path / "ct-out", ResultsConfig()),
        *write_all(
            cxr_result,
            {"series": SeriesInput("1", (cxr,))},
            PROVENANCE,
            tmp_path / "cxr-out",
            ResultsConfig(),
        ),
    ]
    sent = {
        (w.kind, w.sop_class_uid, str(dcmread(w.path).file_meta.TransferSyntaxUID)) for w in written
    }
    declared = {(o.kind, o.sop_class_uid, o.transfer_syntax_uid) for o in CREATED_OBJECTS}
    assert sent == declared
    assert _doc_region_uids("scu-sop-classes") == [o.sop_class_uid for o in CREATED_OBJECTS]
    contexts = regions_of(DOC.read_text())["scu-presentation-contexts"]
    for o in CREATED_OBJECTS:
        assert f"`{o.transfer_syntax_uid}` | SCU" in contexts
