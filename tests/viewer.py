"""A real viewer for tests: Orthanc (with its DICOMweb plugin) behind a small static + proxy
server that serves OHIF's prebuilt app, driven by playwright-core in Debian's Chromium.

OHIF's index needs a fallback route and its BulkDataURIs must resolve to the page's own origin,
so the app and Orthanc's DICOMweb are served from one origin here: /dicom-web/ is passed to
Orthanc with the Host header kept (Orthanc builds its BulkDataURIs from it), everything else is
the OHIF build, with index.html for the app's routes and our own app-config.js.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.peers import free_port

ROOT = Path(__file__).resolve().parents[1]
VIEWER_TOOLS = ROOT / "tests" / "viewer"  # package.json: the pinned OHIF and playwright-core
OHIF_DIST = VIEWER_TOOLS / "ohif" / "package" / "dist"
CHROMIUM = Path("/usr/bin/chromium")
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test)',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def missing() -> list[str]:
    """What the viewer test needs and this machine lacks."""
    needed = {
        "orthanc": ORTHANC,
        "orthanc-dicomweb": DICOMWEB_PLUGIN,
        "chromium": CHROMIUM,
        "OHIF build (make viewer-tools)": OHIF_DIST / "index.html",
        "playwright-core (make viewer-tools)": VIEWER_TOOLS / "node_modules" / "playwright-core",
    }
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


class _Handler(SimpleHTTPRequestHandler):
    """OHIF's files, its routes falling back to index.html, /dicom-web/ proxied to Orthanc."""

    upstream = ""

    def log_message(self, *args: object) -> None:  # quiet: the test reports what matters
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        elif self.path.split("?")[0] == "/app-config.js":
            body = APP_CONFIG.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            local = Path(self.translate_path(self.path))
            if not local.is_file():
                self.path = "/index.html"  # the app's own routes (/viewer?...)
            super().do_GET()

    def _proxy(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host")}
        request = urllib.request.Request(self.upstream + self.path, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as error:
            response = error
        body = response.read()
        self.send_response(response.status)
        for key, value in response.headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class ViewerServer:
    """OHIF and Orthanc's DICOMweb on one origin, in a thread."""

    orthanc: Orthanc
    port: int = 0
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> ViewerServer:
        handler = type("Handler", (_Handler,), {"upstream": self.orthanc.url})
        self.port = free_port()
        self.server = ThreadingHTTPServer(
            ("127.0.0.1", self.port), partial(handler, directory=str(OHIF_DIST))
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def run_check(
    script: Path, url: str, study_uid: str, out: Path, center: list[float], timeout_s: float = 240
) -> dict:
    """Run the playwright-core script that opens the study in OHIF; its JSON report."""
    node = shutil.which("node")
    assert node is not None, "node is needed for playwright-core"
    done = subprocess.run(
        [node, str(script), url, study_uid, str(out), str(CHROMIUM), json.dumps(center)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=VIEWER_TOOLS,
    )
    if done.returncode != 0:
        raise AssertionError(f"viewer check failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
