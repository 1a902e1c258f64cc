"""Finding and driving the real DICOM peers (dcmtk, Orthanc) that tests and benchmarks talk
to, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        return s.getsockname()[1]


def missing_orthanc() -> list[str]:
    """The Debian packages for Orthanc that this machine lacks."""
    needed = {"orthanc": ORTHANC, "orthanc-dicomweb": DICOMWEB_PLUGIN}
    return [name for name, path in needed.items() if not path.exists()]


@dataclass
class Orthanc:
    """Orthanc on 127.0.0.1 with a throwaway storage folder and the DICOMweb plugin."""

    workdir: Path
    http_port: int = 0
    proc: subprocess.Popen | None = None
    dicom_port: int = 0  # 0: no DICOM server
    aet: str = "ORTHANC"
    modalities: dict[str, list] = field(default_factory=dict)  # name -> [AET, host, port]
    extra: dict = field(default_factory=dict)  # more Orthanc settings

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
        self.proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
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
