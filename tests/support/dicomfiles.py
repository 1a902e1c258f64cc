"""Helpers for tests: reading what a Part-10 file holds and what the node stored."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble

from tests.support.peers import require_tool


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, the encoded data set after the file meta) of a Part-10 file."""
    with path.open("rb") as f:
        read_preamble(f, force=True)
        meta = _read_file_meta_info(f)
        return str(meta.TransferSyntaxUID), f.read()


def corpus_instances(root: Path) -> dict[str, list[Path]]:
    """SOP Instance UID -> the corpus files holding it (several files may share one)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = ds.get("SOPInstanceUID")
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if uid:
            found[str(uid)].append(path)
    return dict(found)


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_SUCCESS = "I: Received Store Response (Success)"


def storescu_acknowledged(output: str) -> list[Path]:
    """Files that storescu (run with -v) saw acknowledged with Success, in order."""
    acknowledged: list[Path] = []
    current: Path | None = None
    for line in output.splitlines():
        match = _SENDING.match(line)
        if match:
            current = Path(match.group(1))
        elif line.startswith(_SUCCESS) and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def assert_same_content(original: Path, stored: Path, *, byte_identical: bool) -> None:
    """The stored copy holds the same data set: byte for byte, or element for element."""
    original_ts, original_bytes = dataset_bytes(original)
    stored_ts, stored_bytes = dataset_bytes(stored)
    assert stored_ts == original_ts, f"{original.name}: transfer syntax changed"
    if byte_identical or original_bytes == stored_bytes:
        assert stored_bytes == original_bytes, f"{original.name}: data set bytes differ"
        return
    a, b = _normalised(dcmread(original)), _normalised(dcmread(stored))
    # Values, not VRs: encapsulated Pixel Data is OB whatever VR a malformed file declared.
    assert {e.tag: e.value for e in a} == {e.tag: e.value for e in b}, (
        f"{original.name}: data set content differs"
    )


def _normalised(ds: Dataset) -> Dataset:
    """The data set without what a conformant sender may legitimately rewrite.

    dcmtk recomputes group lengths (PS3.5 7.2), drops Data Set Trailing Padding (PS3.10 7.2)
    and pads odd-length values of malformed files to even length (PS3.5 7.1.1).
    """
    for element in list(ds):
        if element.tag.element == 0 or element.tag == 0xFFFCFFFC:
            del ds[element.tag]
        elif isinstance(element.value, bytes) and len(element.value) % 2:
            element.value += b"\0"
    return ds


# dciodvfy warnings the corpus's anonymised sources pass on to every object derived from them
# (the patient and study modules are copied, as the standard asks): no StudyID, and a UUID as
# PatientName, a single-component name.
CORPUS_SOURCE_WARNINGS = ("Study ID", "Patient's Name")


def dciodvfy(path: Path, *, from_source: tuple[str, ...] = ()) -> list[str]:
    """dciodvfy's warnings for ``path`` other than those ``from_source`` justifies; fails the
    test on any error."""
    report = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    output = report.stdout + report.stderr
    assert "Error" not in output, f"{path.name}: {output}"
    warnings = [line for line in output.splitlines() if line.startswith("Warning")]
    return [w for w in warnings if not any(known in w for known in from_source)]
