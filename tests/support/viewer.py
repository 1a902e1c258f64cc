"""A real viewer for tests: a DICOMweb origin (Orthanc from dicom_node.testing with its DICOMweb
plugin, or a node's own /dicom-web) behind a small static + proxy server that serves OHIF's
prebuilt app, driven by playwright-core in Debian's Chromium.

OHIF's index needs a fallback route and its BulkDataURIs must resolve to the page's own origin,
so the app and the origin's DICOMweb are served from one origin here: /dicom-web/ is passed on
with the Host header kept (Orthanc and the node build their BulkDataURIs from it), everything
else is the OHIF build, with index.html for the app's routes and the compose demo's
app-config.js.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.testing import Orthanc, free_port, missing_orthanc
from tests.support.paths import ROOT

VIEWER_TOOLS = ROOT / "tests" / "viewer"  # package.json: the pinned OHIF and playwright-core
OHIF_DIST = VIEWER_TOOLS / "ohif" / "package" / "dist"
CHROMIUM = Path("/usr/bin/chromium")

# The viewer tests run OHIF with the compose demo's own configuration, so the configuration
# that ships is the one a real browser is shown to work with.
APP_CONFIG_FILE = ROOT / "deploy" / "compose" / "ohif" / "app-config.js"


def missing() -> list[str]:
    """What the viewer test needs and this machine lacks."""
    needed = {
        "chromium": CHROMIUM,
        "OHIF build (make viewer-tools)": OHIF_DIST / "index.html",
        "playwright-core (make viewer-tools)": VIEWER_TOOLS / "node_modules" / "playwright-core",
    }
    return missing_orthanc() + [name for name, path in needed.items() if not path.exists()]


class _Handler(SimpleHTTPRequestHandler):
    """OHIF's files, its routes falling back to index.html, /dicom-web/ proxied to the origin."""

    upstream = ""
    token: str | None = None

    def log_message(self, *args: object) -> None:  # quiet: the test reports what matters
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        elif self.path.split("?")[0] == "/app-config.js":
            body = APP_CONFIG_FILE.read_bytes()
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
        if self.token:  # as a deployment's reverse proxy would add it for its users
            headers["Authorization"] = f"Bearer {self.token}"
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
    """OHIF and a DICOMweb origin on one origin, in a thread: Orthanc's, or (``upstream``)
    any other's root, such as a node's HTTP service, with its bearer ``token``."""

    orthanc: Orthanc | None = None
    port: int = 0
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    upstream: str = ""
    token: str | None = None

    def start(self) -> ViewerServer:
        upstream = self.orthanc.url if self.orthanc is not None else self.upstream
        assert upstream, "an Orthanc or an upstream URL"
        handler = type("Handler", (_Handler,), {"upstream": upstream, "token": self.token})
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


@pytest.fixture(scope="module")
def browser_ready() -> None:
    """The dashboard tests' browser: Debian's Chromium, node and playwright-core (skipped
    without them, failed in CI)."""
    lacking = [
        name
        for name, present in {
            "chromium": CHROMIUM.exists(),
            "node": shutil.which("node") is not None,
            "playwright-core (make viewer-tools)": (
                VIEWER_TOOLS / "node_modules" / "playwright-core"
            ).exists(),
        }.items()
        if not present
    ]
    if lacking:
        message = f"the dashboard test needs: {', '.join(lacking)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def check_dashboard(
    http_url: str, study_uid: str, out_dir: Path, screenshot: str = "dashboard.png"
) -> dict:
    """Use a node's dashboard as an operator would (tests/viewer/check_dashboard.mjs): its
    JSON report; the screenshot goes to ``out_dir / screenshot``."""
    out_dir.mkdir(exist_ok=True)
    done = subprocess.run(
        [
            shutil.which("node") or "node",
            str(VIEWER_TOOLS / "check_dashboard.mjs"),
            http_url,
            study_uid,
            str(out_dir),
            str(CHROMIUM),
            screenshot,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=VIEWER_TOOLS,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])
