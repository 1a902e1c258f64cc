"""A `dicom-node serve` under test: the serve process with what the tests ask of it (dcmtk's
storescu against it, nothing acknowledged lost), polling, and the example plugin's
environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dicom_node.testing import ServeProcess, dcmtk_env
from tests.support.dicomfiles import assert_same_content
from tests.support.paths import PLUGINS
from tests.support.peers import require_tool


def wait_until(
    check: Callable[[], object], timeout_s: float = 60.0, what: str = "", log: str = ""
) -> object:
    """Poll ``check`` until it returns something truthy, and return that; fail naming what
    was awaited (and the end of a node's log, when given) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log[-5000:]}")


def plugin_env() -> dict[str, str]:
    """The environment of a node that finds the example plugin package as if pip-installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), *sys.path])}


class NodeProcess(ServeProcess):
    """A `dicom-node serve` subprocess with its own data folder and port."""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`dicom-node <args>` against this node's configuration (a replay, a listing): its
        exit status and what it printed, for the test to judge."""
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            env=self.env,
        )

    def assert_kept(self, acknowledged: Iterable[Path], *, byte_identical: bool) -> None:
        """Nothing acknowledged is lost: each file sent is indexed, on disk, and holds the
        data set as sent (byte for byte, or element for element)."""
        from pydicom import dcmread

        indexed = dict(self.query("SELECT sop_instance_uid, path FROM instances"))
        for path in acknowledged:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in indexed, f"{path} was acknowledged but is not in the index"
            stored = self.data_dir / indexed[uid]
            assert stored.is_file(), f"{path} was acknowledged but its file is gone"
            assert_same_content(path, stored, byte_identical=byte_identical)

    def storescu(
        self,
        *options: str,
        files: list,
        aet: str = "STORESCU",
        aec: str = "DICOMNODE",
        timeout_s: float = 300,
    ) -> subprocess.CompletedProcess:
        """Run dcmtk storescu against this node (never raises on its exit status)."""
        return subprocess.run(
            [
                require_tool("storescu"),
                "-aet",
                aet,
                "-aec",
                aec,
                *options,
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


def closed_by_node(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the node closes the connection within ``timeout_s`` (PDUs it sends first, an
    A-ABORT or A-ASSOCIATE-RJ, are read and dropped)."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:  # reset by the node: closed as well
        return True
    return False
