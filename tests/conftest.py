"""Shared fixtures: real `dicom-node serve` processes and real dcmtk peers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dicom_node.database import connect, database_path
from tests.peers import dcmtk_env, dcmtk_tool, free_port

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "dicom-corpus"
MODEL_ZOO = ROOT.parent / "shared" / "model-zoo-configs"


def require_tool(name: str) -> str:
    """The path of a peer program; in CI a missing one is a failure, elsewhere a skip."""
    path = dcmtk_tool(name)
    if path is None:
        message = f"{name} is not installed (apt-get install dcmtk dicom3tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


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


@dataclass
class NodeProcess:
    """A `dicom-node serve` subprocess with its own data folder and port."""

    workdir: Path
    settings: dict = field(default_factory=dict)
    env: dict[str, str] | None = None
    port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "node.yaml"

    def write_config(self) -> None:
        config = {
            "scp": {"host": "127.0.0.1", "port": self.port},
            "store": {"data_dir": str(self.data_dir), "min_free_bytes": 0},
            "http": {"host": "127.0.0.1", "port": self.http_port},
        }
        for section, values in self.settings.items():
            config.setdefault(section, {}).update(values)
        self.http_port = config["http"]["port"]
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, timeout_s: float = 20.0) -> NodeProcess:
        if not self.port:
            self.port = free_port()
        if not self.http_port:
            self.http_port = free_port()
        self.write_config()
        seen = len(self.log())
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited at start:\n{self.log()}")
            if "listening as" in self.log()[seen:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"node did not start:\n{self.log()}")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def query(self, sql: str, params: tuple = ()) -> list:
        conn = connect(database_path(self.data_dir), readonly=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def wait_for(self, sql: str, expected: object, timeout_s: float = 20.0) -> object:
        """Poll a scalar query until it equals ``expected``; returns the last value."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.query(sql)[0][0]
            if value == expected:
                return value
            time.sleep(0.05)
        return value

    def results(self, count: int, timeout_s: float = 180.0) -> list[tuple[dict, Path]]:
        """Wait for ``count`` succeeded inference jobs; their result.json and folders."""
        done = "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND state = 'succeeded'"
        assert self.wait_for(done, count, timeout_s) == count, self.log()
        found = []
        for row in self.query("SELECT path FROM results ORDER BY job_id"):
            path = self.data_dir / row["path"]
            found.append((json.loads(path.read_text()), path.parent))
        return found

    def status(self) -> str:
        """What `dicom-node status` prints for this node."""
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", "status", "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def assert_kept(self, acknowledged: Iterable[Path], *, byte_identical: bool) -> None:
        """Nothing acknowledged is lost: each file sent is indexed, on disk, and holds the
        data set as sent (byte for byte, or element for element)."""
        from pydicom import dcmread

        from tests.dicomfiles import assert_same_content

        indexed = dict(self.query("SELECT sop_instance_uid, path FROM instances"))
        for path in acknowledged:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in indexed, f"{path} was acknowledged but is not in the index"
            stored = self.data_dir / indexed[uid]
            assert stored.is_file(), f"{path} was acknowledged but its file is gone"
            assert_same_content(path, stored, byte_identical=byte_identical)

    def outputs(self) -> dict[str, Path]:
        """The DICOM objects written for results, by kind (SEG, SR, SC)."""
        rows = self.query("SELECT kind, path FROM outputs ORDER BY job_id, kind")
        return {row["kind"]: self.data_dir / row["path"] for row in rows}

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
