"""Talking to a node's HTTP service: a request with or without a token, JSON, Prometheus
metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


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
