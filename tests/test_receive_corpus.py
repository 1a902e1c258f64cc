"""Every file of the real corpus, sent by dcmtk and by pynetdicom, comes back as it was sent."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from dicom_node.scu import send
from dicom_node.testing import dcmtk_env
from tests.support.dicomfiles import (
    assert_same_content,
    corpus_instances,
    dataset_bytes,
    storescu_acknowledged,
)
from tests.support.node import NodeProcess
from tests.support.peers import STORESCU_PROPOSE, require_tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def instances(corpus: Path) -> dict[str, list[Path]]:
    found = corpus_instances(corpus)
    assert len(found) > 300, "the corpus looks incomplete"
    return found


def stored_row(node: NodeProcess, sop_instance_uid: str):
    rows = node.query(
        "SELECT i.path, i.series_uid, i.study_uid, s.study_uid AS series_study"
        " FROM instances i JOIN series s USING (series_uid) WHERE sop_instance_uid = ?",
        (sop_instance_uid,),
    )
    assert rows, f"{sop_instance_uid} acknowledged but not indexed"
    return rows[0]


def check_stored(node: NodeProcess, original: Path, uid: str, *, byte_identical: bool) -> None:
    from pydicom import dcmread

    ds = dcmread(original, stop_before_pixels=True)
    row = stored_row(node, uid)
    assert row["series_uid"] == ds.SeriesInstanceUID
    assert row["study_uid"] == row["series_study"] == ds.StudyInstanceUID
    assert_same_content(original, node.data_dir / row["path"], byte_identical=byte_identical)


def test_echoscu(node: NodeProcess) -> None:
    result = subprocess.run(
        [require_tool("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_storescu_sends_the_whole_corpus(node: NodeProcess, instances) -> None:
    unique = {uid: paths[0] for uid, paths in instances.items() if len(paths) == 1}
    by_syntax: dict[str, list[Path]] = defaultdict(list)
    for path in unique.values():
        by_syntax[dataset_bytes(path)[0]].append(path)

    acknowledged: list[Path] = []
    for syntax, paths in sorted(by_syntax.items()):
        if syntax not in STORESCU_PROPOSE:
            continue  # storescu cannot propose it (retired JPEG processes): pynetdicom test
        result = node.storescu("-v", "-R", "-nh", *STORESCU_PROPOSE[syntax], files=paths)
        acknowledged += storescu_acknowledged(result.stdout + result.stderr)

    uid_of = {path: uid for uid, path in unique.items()}
    # dcmtk 3.6.7 knows every storage class in the corpus but the 2024 Label Map SEG.
    assert len(acknowledged) >= len(unique) - 8
    for path in acknowledged:
        check_stored(node, path, uid_of[path], byte_identical=False)
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == len(acknowledged)


def test_repeated_uid_latest_copy_wins(node: NodeProcess, instances) -> None:
    """Files sharing a SOP Instance UID (one CT slice in ten syntaxes): each resend replaces.

    This is the documented rule for a repeated SOP Instance UID with different content.
    """
    shared = [(uid, paths) for uid, paths in instances.items() if len(paths) > 1]
    assert shared
    for uid, paths in shared:
        for path in paths:
            report = send([path], "127.0.0.1", node.port)
            assert report.sent == [path], report.failed
            check_stored(node, path, uid, byte_identical=True)
        assert (
            node.query("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (uid,))[0][0]
            == 1
        )


def test_pynetdicom_scu_sends_every_file_byte_identical(node: NodeProcess, instances) -> None:
    firsts = {uid: paths[-1] for uid, paths in instances.items()}
    report = send(list(firsts.values()), "127.0.0.1", node.port, calling_aet="PYNETDICOM")
    assert not report.failed and not report.skipped, report.failed[:5]
    assert len(report.sent) == len(firsts)
    for uid, path in firsts.items():
        check_stored(node, path, uid, byte_identical=True)
    # An identical resend changes nothing and is acknowledged.
    again = send(list(firsts.values())[:20], "127.0.0.1", node.port, calling_aet="PYNETDICOM")
    assert len(again.sent) == 20
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == len(firsts)
