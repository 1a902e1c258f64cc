"""Who may associate, what is refused, and concurrent senders — over real associations."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_node.phantoms import CtPhantomSpec, ct_series, write_ct_series
from dicom_node.testing import dcmtk_env
from tests.support.dicomfiles import storescu_acknowledged
from tests.support.node import NodeProcess
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration


def echoscu(node: NodeProcess, *, aet: str, aec: str = "DICOMNODE") -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("echoscu"), "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_allow_list_admits_listed_peers_only(make_node) -> None:
    node = make_node(scp={"allowed_calling_aets": ["MODALITY@127.0.0.1", "PACS@10.1.2.3"]})
    assert echoscu(node, aet="MODALITY").returncode == 0
    refused = echoscu(node, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    # Listed, but bound to another host.
    assert echoscu(node, aet="PACS").returncode != 0
    log = node.log()
    assert "rejected association from calling AE 'INTRUDER' at 127.0.0.1" in log
    assert "'PACS' at 127.0.0.1" in log


def test_no_allow_list_warns_once(node: NodeProcess) -> None:
    assert echoscu(node, aet="ANYONE").returncode == 0
    assert echoscu(node, aet="ANYONE2").returncode == 0
    assert node.log().count("allowed_calling_aets is not set") == 1


def test_wrong_called_ae_is_rejected(node: NodeProcess) -> None:
    refused = echoscu(node, aet="MODALITY", aec="NOTUS")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr


def _store(node: NodeProcess, ds: Dataset) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.fixture(autouse=True)
def _quiet_invalid_uid_warnings():
    # The bad UIDs below are the point of those tests.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)
        yield


def _slice(**changes) -> Dataset:
    ds = next(ct_series(CtPhantomSpec(slices=1, rows=16, columns=16)))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _nothing_stored(node: NodeProcess) -> None:
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert list((node.data_dir / "tmp").iterdir()) == []
    assert not list((node.data_dir / "instances").rglob("*.dcm"))


@pytest.mark.parametrize(
    ("changes", "logged"),
    [
        ({"SOPInstanceUID": "../../etc/x"}, "SOPInstanceUID is not a valid UID"),
        ({"SeriesInstanceUID": "1.2.3/../../../x"}, "SeriesInstanceUID is not a valid UID"),
        ({"StudyInstanceUID": None}, "StudyInstanceUID is missing"),
        ({"SeriesInstanceUID": ""}, "SeriesInstanceUID is missing"),
    ],
)
def test_bad_uids_are_refused_and_nothing_is_stored(node: NodeProcess, changes, logged) -> None:
    assert _store(node, _slice(**changes)) == 0xC000
    _nothing_stored(node)
    assert logged in node.log()
    assert not (node.workdir.parent / "etc").exists()


def test_sop_instance_mismatch_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    """The data set must be the instance the C-STORE request names (PS3.4 B.2.3)."""
    import dicom_node.scu  # noqa: F401  (sends files raw: the request's UIDs come from the meta)

    ds = _slice()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "mismatch.dcm"
    ds.preamble = b"\0" * 128
    ds.save_as(path)  # without enforce_file_format pydicom keeps the (wrong) meta as it is
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(status.Status) == 0xA900
    _nothing_stored(node)


def test_disk_watermark_answers_out_of_resources(make_node, tmp_path: Path) -> None:
    node = make_node(store={"min_free_bytes": 2**62})
    folder = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=3, rows=32, columns=32))
    result = node.storescu("-v", "-nh", files=folder)
    assert storescu_acknowledged(result.stdout + result.stderr) == []
    assert "Refused: OutOfResources" in result.stdout + result.stderr  # 0xA700
    _nothing_stored(node)
    assert "below the watermark" in node.log()


def test_four_concurrent_associations_each_with_its_own_study(node: NodeProcess, tmp_path) -> None:
    studies = [
        write_ct_series(tmp_path / f"study{i}", CtPhantomSpec(slices=40, rows=128, columns=128))
        for i in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda files: node.storescu("-v", aet="MODALITY", files=files), studies)
        )
    for files, result in zip(studies, results, strict=True):
        assert len(storescu_acknowledged(result.stdout + result.stderr)) == len(files)
    rows = node.query(
        "SELECT study_uid, COUNT(*) AS n, COUNT(DISTINCT series_uid) AS s FROM instances"
        " GROUP BY study_uid"
    )
    assert sorted((r["n"], r["s"]) for r in rows) == [(40, 1)] * 4
    assert node.wait_for("SELECT COUNT(*) FROM series WHERE completed_at IS NOT NULL", 4) == 4
