"""Real peers on 127.0.0.1 for the test suite and the benchmarks: dcmtk's programs, Orthanc
with its DICOMweb plugin, and `dicom-node serve` itself as a subprocess.

The node never imports this module; it is here, not under tests/, because the benchmarks
(benchmarks/) drive the same peers and must not import the test suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dicom_node.config import load_config
from dicom_node.database import Row, open_reader

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dcmtk_tool(name: str) -> str | None:
    """The path of a dcmtk/dicom3tools program, or None.

    Debian's binaries come first: Python packages install scripts named like dcmtk's tools
    (pynetdicom's own ``storescu``) that shadow them on PATH.
    """
    debian = Path("/usr/bin") / name
    return str(debian) if debian.exists() else shutil.which(name)


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY dcmtk's Nagle/delayed-ACK interplay adds ~40 ms per message.
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def missing_orthanc() -> list[str]:
    """The Debian packages for Orthanc that this machine lacks."""
    needed = {"orthanc": ORTHANC, "orthanc-dicomweb": DICOMWEB_PLUGIN}
    return [name for name, path in needed.items() if not path.exists()]


@dataclass
class Orthanc:
    """Orthanc on 127.0.0.1 with a throwaway storage folder and the DICOMweb plugin."""

    workdir: Path
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    dicom_port: int = 0  # 0: no DICOM server
    aet: str = "ORTHANC"
    modalities: dict[str, list[Any]] = field(default_factory=dict)  # name -> [AET, host, port]
    extra: dict[str, Any] = field(default_factory=dict)  # more Orthanc settings

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        self.http_port = self.http_port or free_port()
        config = {
            "Name": "DICOMNODE-TEST",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomServerEnabled": bool(self.dicom_port),
            "DicomPort": self.dicom_port or 4242,
            "DicomAet": self.aet,
            "DicomModalities": self.modalities,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        config.update(self.extra)
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.workdir / "orthanc.log").open("w")
        # Orthanc receives through dcmtk, which reads the same switch as dcmtk's tools.
        self.proc = subprocess.Popen(
            [str(ORTHANC), str(path)], stdout=log, stderr=log, env=dcmtk_env()
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                    ready = response.status == 200
                if ready and self.dicom_port:
                    # The HTTP answer does not say the DICOM port listens yet: a sender that
                    # came too early would meet a refused connection, not Orthanc's answer.
                    socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2).close()
                if ready:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start: {(self.workdir / 'orthanc.log').read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def upload(self, path: Path) -> None:
        request = urllib.request.Request(
            f"{self.url}/instances", data=path.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, path

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any, timeout_s: float = 120) -> Any:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")


S = TypeVar("S", bound="ServeProcess")


@dataclass
class ServeProcess:
    """A `dicom-node serve` subprocess with its own data folder, configuration and ports.

    ``settings`` are configuration sections merged over what the process needs to be reached
    (SCP and HTTP on 127.0.0.1, ports free now, the store in ``workdir``/data).
    """

    workdir: Path
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] | None = None
    port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

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
        config: dict[str, dict[str, Any]] = {
            "scp": {"host": "127.0.0.1", "port": self.port},
            "store": {"data_dir": str(self.data_dir), "min_free_bytes": 0},
            "http": {"host": "127.0.0.1", "port": self.http_port},
        }
        for section, values in self.settings.items():
            config.setdefault(section, {}).update(values)
        self.http_port = config["http"]["port"]
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self: S, timeout_s: float = 20.0) -> S:
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

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Read the node's database (SQLite or, in cluster mode, PostgreSQL) read-only."""
        config = load_config(self.config_path, environ=os.environ if self.env is None else self.env)
        with open_reader(config) as conn:
            return conn.execute(sql, params).fetchall()

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

    def results(self, count: int, timeout_s: float = 180.0) -> list[tuple[dict[str, Any], Path]]:
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

    def outputs(self) -> dict[str, Path]:
        """The DICOM objects written for results, by kind (SEG, SR, SC)."""
        rows = self.query("SELECT kind, path FROM outputs ORDER BY job_id, kind")
        return {row["kind"]: self.data_dir / row["path"] for row in rows}
