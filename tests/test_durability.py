"""Nothing acknowledged is ever lost: SIGKILL in the middle of a transfer, then restart."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.testing import dcmtk_env
from tests.support.dicomfiles import storescu_acknowledged
from tests.support.node import NodeProcess
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ct300(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ct300")
    return write_ct_series(folder, CtPhantomSpec(slices=300, rows=256, columns=256))


def storescu_in_background(node: NodeProcess, files: list[Path]) -> subprocess.Popen:
    command = [require_tool("storescu"), "-v", "-aet", "STORESCU", "-aec", "DICOMNODE"]
    return subprocess.Popen(
        [*command, "127.0.0.1", str(node.port), *map(str, files)],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_kill_during_transfer_loses_nothing_acknowledged(make_node, ct300) -> None:
    # Receiving alone: inference of the 300 slices would hold up the final stop on a loaded
    # machine, and it is not what this test is about.
    node: NodeProcess = make_node(worker={"enabled": False})
    sender = storescu_in_background(node, ct300)
    # Kill once a good part (but not all) of the series was acknowledged.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        count = node.query("SELECT COUNT(*) FROM instances")[0][0]
        if count >= 60:
            break
        time.sleep(0.01)
    node.kill()
    output, _ = sender.communicate(timeout=60)
    acknowledged = storescu_acknowledged(output)
    # The 60th row may be committed with its response not yet sent when the kill lands.
    assert 50 <= len(acknowledged) < 300, "the kill did not land mid-transfer"

    node.start()
    tmp_leftovers = list((node.data_dir / "tmp").iterdir())
    assert tmp_leftovers == []
    assert not list((node.data_dir / "instances").rglob("*.part"))
    node.assert_kept(acknowledged, byte_identical=False)
    indexed = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    # Every file under instances/ is a complete, indexed instance.
    on_disk = {p.relative_to(node.data_dir).as_posix() for p in node.data_dir.rglob("*.dcm")}
    assert set(indexed.values()) <= on_disk
    for extra in on_disk - set(indexed.values()):
        # Renamed but not yet indexed when killed: complete, and never acknowledged.
        dcmread(node.data_dir / extra)

    # The PACS resends the whole series: idempotent, complete.
    result = node.storescu("-v", files=ct300)
    assert len(storescu_acknowledged(result.stdout + result.stderr)) == 300
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 300
    again = node.storescu("-v", files=ct300[:10])
    assert len(storescu_acknowledged(again.stdout + again.stderr)) == 10
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 300
    assert node.stop() == 0


def test_sigterm_finishes_in_flight_transfer(make_node, ct300) -> None:
    node: NodeProcess = make_node()
    sender = storescu_in_background(node, ct300[:150])
    while node.query("SELECT COUNT(*) FROM instances")[0][0] < 20:
        time.sleep(0.01)
    assert node.stop() == 0  # SIGTERM: stop accepting, finish the open association
    output, _ = sender.communicate(timeout=60)
    assert sender.returncode == 0, output
    assert len(storescu_acknowledged(output)) == 150
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 150
    assert "stopped" in node.log()
