"""Talking to a node's HTTP service: a request with or without a token, JSON, Prometheus
metrics; and the base of the little HTTP servers that stand in for a node's destinations."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.parser import text_string_to_metric_families

from dicom_node.testing import free_port


def request(
    url: str, *, token: str | None = None, method: str = "GET", json_body: bool = True
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if method == "POST":
        data = b"{}"
        headers["Content-Type"] = "application/json" if json_body else "text/plain"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_json(url: str, **kwargs) -> tuple[int, object]:
    status, body = request(url, **kwargs)
    return status, json.loads(body)


def metrics(url: str, **kwargs) -> dict[tuple[str, tuple], float]:
    status, body = request(url + "/metrics", **kwargs)
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the test output free of access lines."""

    def log_message(self, *args: object) -> None:
        pass


class HttpReceiver:
    """An HTTP server on 127.0.0.1 (``port``, a free one by default), each request on its own
    thread; a subclass's ``start`` passes its handler to :meth:`serve`. ``lock`` guards what
    the handler records."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
