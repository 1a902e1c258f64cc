"""The HTTP service of a real `dicom-node serve`: health, readiness, metrics, JSON API, token."""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import load_config
from dicom_node.errors import ConfigError
from dicom_node.phantoms import cxr_dataset
from dicom_node.testing import free_port
from dicom_node.web import store_check
from tests.support.http import get_json, metrics, request
from tests.support.node import wait_until

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def cxr_file(tmp_path: Path) -> Path:
    path = tmp_path / "cxr.dcm"
    cxr_dataset().save_as(path, enforce_file_format=True)
    return path


@pytest.mark.integration
def test_health_readiness_metrics_and_api_follow_a_study(make_node, cxr_file):
    node = make_node(assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1})
    url = node.http_url
    assert get_json(url + "/healthz") == (200, {"status": "ok"})
    ready = wait_until(
        lambda: get_json(url + "/readyz")[0] == 200, what="readiness (worker started)"
    )
    assert ready
    status, report = get_json(url + "/readyz")
    assert report == {
        "ready": True,
        "checks": {"store": "ok", "index": "ok", "scp": "ok", "worker": "ok", "loops": "ok"},
    }

    assert node.storescu(files=[cxr_file], aet="MODALITY").returncode == 0
    refused = node.storescu(files=[cxr_file], aet="MODALITY", aec="NOT-THE-NODE")
    assert refused.returncode != 0
    node.results(1)

    seen = metrics(url)
    assert seen[("dicom_node_associations_total", (("result", "accepted"),))] == 1
    assert seen[("dicom_node_associations_total", (("result", "rejected"),))] == 1
    assert seen[("dicom_node_instances_received_total", (("result", "stored"),))] == 1
    assert seen[("dicom_node_received_bytes_total", ())] > 500_000
    assert seen[("dicom_node_series_completed_total", ())] == 1
    routed = (("algorithm", "pneumonia-cxr"), ("level", "series"), ("outcome", "routed"))
    assert seen[("dicom_node_routing_decisions_total", routed)] == 1
    succeeded = (("kind", "inference"), ("priority", "routine"), ("state", "succeeded"))
    assert seen[("dicom_node_jobs", succeeded)] == 1
    cxr_on_cpu = (("algorithm", "pneumonia-cxr"), ("device", "cpu"))
    assert seen[("dicom_node_inference_seconds_count", cxr_on_cpu)] == 1
    assert seen[("dicom_node_inference_seconds_sum", cxr_on_cpu)] > 0
    assert seen[("dicom_node_queue_depth", (("queue", "inference"),))] == 0
    for priority in ("stat", "urgent", "routine"):
        assert seen[("dicom_node_inference_queue_depth", (("priority", priority),))] == 0
    assert seen[("dicom_node_disk_free_bytes", ())] > 0
    assert [v for (name, _), v in seen.items() if name == "dicom_node_worker_up"] == [1]

    study_uid = str(dcmread(cxr_file, stop_before_pixels=True).StudyInstanceUID)
    status, studies = get_json(url + "/api/studies")
    assert status == 200
    assert [s["study_uid"] for s in studies] == [study_uid]
    assert studies[0]["senders"] == ["MODALITY"]
    assert studies[0]["jobs"]["succeeded"] == 1

    status, study = get_json(url + f"/api/studies/{study_uid}")
    assert status == 200
    assert [s["modality"] for s in study["series"]] == ["CR"]
    routed_to = {r["algorithm"] for d in study["decisions"] for r in d["routed"]}
    assert routed_to == {"pneumonia-cxr"}
    reasons = {n["algorithm"]: n["reason"] for d in study["decisions"] for n in d["not_routed"]}
    assert reasons.get("lung-nodules-ct")
    (job,) = study["jobs"]
    # The list's one-line counts agree with the study's own page.
    assert studies[0]["jobs"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 0,
    }
    assert studies[0]["series"] == len(study["series"]) == 1 and studies[0]["instances"] == 1
    assert job["state"] == "succeeded" and job["device"] == "cpu"
    assert sorted(o["kind"] for o in job["outputs"]) == ["SC", "SR"]
    steps = [s["step"] for s in job["timeline"]]
    assert steps == ["received", "complete", "routed", "started", "inference", "written"]
    times = [s["at"] for s in job["timeline"]]
    assert all(t is not None for t in times) and times == sorted(times)

    assert get_json(url + f"/api/jobs/{job['id']}")[1]["id"] == job["id"]
    assert get_json(url + "/api/jobs/999999")[0] == 404
    assert get_json(url + "/api/studies/1.2.3.4")[0] == 404
    assert get_json(url + "/api/jobs?limit=zero")[0] == 400
    algorithms = get_json(url + "/api/algorithms")[1]
    names = {a["name"]: a for a in algorithms["algorithms"]}
    assert names["pneumonia-cxr"]["demo"] is True
    assert "DEMO" in names["pneumonia-cxr"]["weights"]
    # No token configured on loopback: the API answers without one.
    assert request(url + "/api/deliveries")[0] == 200


@pytest.mark.integration
def test_readiness_fails_while_the_worker_is_dead(make_node):
    node = make_node()
    url = node.http_url
    wait_until(lambda: get_json(url + "/readyz")[0] == 200, what="readiness")
    (worker,) = [w for w in get_json(url + "/api/workers")[1] if w["alive"]]
    os.kill(worker["pid"], signal.SIGKILL)
    _, report = wait_until(
        lambda: (r := get_json(url + "/readyz"))[0] == 503 and r, what="not ready"
    )
    assert report["checks"]["worker"].startswith(
        ("1 of 1 inference worker process(es) not alive", "inference worker(s) starting: ")
    )
    assert report["checks"]["store"] == "ok"
    # The supervisor starts a new worker; the node becomes ready again by itself.
    wait_until(lambda: get_json(url + "/readyz")[0] == 200, what="ready again")


@pytest.mark.integration
def test_without_a_worker_the_node_is_not_ready(make_node):
    node = make_node(worker={"enabled": False})
    time.sleep(0.5)
    status, report = get_json(node.http_url + "/readyz")
    assert status == 503
    assert report["checks"]["worker"] == "no external inference worker has beaten recently"


@pytest.mark.unit
def test_store_check_reports_an_unwritable_store_and_low_space(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert "is not writable" in store_check(not_a_folder, 0)()
    assert "below store.min_free_bytes" in store_check(tmp_path, 1 << 62)()
    assert store_check(tmp_path, 0)() is None
    assert list(tmp_path.iterdir()) == [not_a_folder]  # the probe leaves nothing behind


@pytest.mark.integration
def test_token_is_enforced(make_node):
    node = make_node(http={"token": TOKEN})
    url = node.http_url
    assert request(url + "/healthz")[0] == 200
    assert request(url + "/readyz")[0] in (200, 503)
    assert request(url + "/")[0] == 200  # the page holds no data; its API calls need the token
    for path in ("/metrics", "/api/studies", "/api/algorithms"):
        assert request(url + path)[0] == 401
        assert request(url + path, token="wrong-token-of-16chars")[0] == 401
        assert request(url + path, token=TOKEN)[0] == 200
    assert request(url + "/api/deliveries/retry-dead", method="POST")[0] == 401
    assert request(url + "/api/deliveries/retry-dead", method="POST", token=TOKEN) == (
        200,
        b'{"queued": 0}',
    )
    # A plain-text POST is what another web page could make a browser send: refused.
    status, _ = request(
        url + "/api/deliveries/retry-dead", method="POST", token=TOKEN, json_body=False
    )
    assert status == 415


@pytest.mark.unit
def test_a_token_is_required_beyond_loopback():
    with pytest.raises(ConfigError, match=r"http\.token"):
        load_config(environ={"DICOM_NODE__HTTP__HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"http\.token"):  # too short to be a secret
        load_config(environ={"DICOM_NODE__HTTP__HOST": "0.0.0.0", "DICOM_NODE__HTTP__TOKEN": "x"})
    config = load_config(
        environ={"DICOM_NODE__HTTP__HOST": "0.0.0.0", "DICOM_NODE__HTTP__TOKEN": TOKEN}
    )
    assert config.http.token == TOKEN


@pytest.mark.integration
def test_http_can_be_switched_off(make_node):
    node = make_node(http={"enabled": False})
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(node.http_url + "/healthz", timeout=2)
    assert "HTTP on" not in node.log()


@pytest.mark.integration
def test_the_port_in_use_is_reported(make_node, tmp_path):
    port = free_port()
    first = make_node("first", http={"port": port})
    assert request(first.http_url + "/healthz")[0] == 200
    with pytest.raises(RuntimeError, match="Address already in use"):
        make_node("second", http={"port": port})
