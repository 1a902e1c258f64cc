"""The dashboard of a node in cluster mode, in a real browser (issue 17): the header says
cluster with PostgreSQL, RabbitMQ and the object store by host:port (no credentials) and the
jobs on their way to a worker; the worker host is listed with its host name and heartbeat; the
study's job says which worker ran it and that it was staged and dispatched; /readyz has a check
per server, all ok. Real PostgreSQL, RabbitMQ and SeaweedFS, a node and a worker host; the
screenshot is test-artefacts/dashboard-cluster.png."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydicom import dcmread

from dicom_node.phantoms import cxr_dataset
from dicom_node.testing import free_port
from tests.support.cluster import cluster_settings, start_cluster_worker, stop_cluster_worker
from tests.support.http import get_json
from tests.support.node import NodeProcess, plugin_env
from tests.support.paths import ROOT
from tests.support.postgres import postgres_server, postgres_url
from tests.support.rabbitmq import RabbitServer, rabbitmq
from tests.support.seaweedfs import SeaweedServer
from tests.support.viewer import browser_ready, check_dashboard

__all__ = ["browser_ready", "postgres_server", "postgres_url", "rabbitmq"]  # fixtures used

pytestmark = pytest.mark.browser

ARTEFACTS = ROOT / "test-artefacts"


def test_the_dashboard_shows_the_cluster_its_worker_host_and_the_jobs_staging(
    make_node: Any,
    tmp_path: Path,
    postgres_url: str,
    rabbitmq: RabbitServer,
    seaweedfs: SeaweedServer,
    browser_ready: None,
) -> None:
    cxr = tmp_path / "cxr.dcm"
    cxr_dataset().save_as(cxr, enforce_file_format=True)
    study_uid = str(dcmread(cxr, stop_before_pixels=True).StudyInstanceUID)
    cluster = cluster_settings(postgres_url, rabbitmq.url, seaweedfs)
    node: NodeProcess = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        # Nothing listens there: the delivery fails once and is a dead letter to retry.
        destinations={
            "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
        },
        routing={"destinations": ["pacs"]},
        delivery={"max_attempts": 1},
        worker={"device": "cpu"},
        cluster=cluster,
        env=plugin_env(),
    )
    host = start_cluster_worker(node.config_path, "gpu-host-a", tmp_path / "gpu-host-a")
    try:
        assert node.storescu(files=[cxr], aet="MODALITY").returncode == 0
        dead = "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'"
        assert node.wait_for(dead, 1, timeout_s=120) == 1, node.log()
        status, ready = get_json(node.http_url + "/readyz")
        assert status == 200, ready
        assert isinstance(ready, dict)
        checks = ready["checks"]
        assert {"postgresql", "rabbitmq", "objects", "worker"} <= set(checks), checks
        assert set(checks.values()) == {"ok"}
        report = check_dashboard(node.http_url, study_uid, ARTEFACTS, "dashboard-cluster.png")
    finally:
        stop_cluster_worker(host)

    assert report["pageErrors"] == [] and report["consoleErrors"] == []
    assert report["studyListed"] and report["ready"] == "ready"
    mode = report["mode"]
    assert mode.startswith(f"cluster: PostgreSQL 127.0.0.1:{urlsplit(postgres_url).port} ")
    assert f"RabbitMQ 127.0.0.1:{rabbitmq.port}" in mode
    assert f"objects {cluster['objects']['url']} at 127.0.0.1:" in mode
    assert "0 unstaged, 0 staged not claimed, 0 lease(s) expired" in mode
    assert "guest" not in mode and cluster["objects"]["secret_access_key"] not in mode
    (worker,) = report["workers"]
    assert worker.startswith("gpu-host-a-0" + socket.gethostname() + "cpu")
    assert "ago" in worker
    (job,) = [j for j in report["jobs"] if "pneumonia-cxr" in j]
    assert "by gpu-host-a-0" in job and "· staged · dispatched" in job
    steps = [s.split(" +")[0] for s in report["steps"]]
    assert steps == [
        "received",
        "complete",
        "routed",
        "staged",
        "dispatched",
        "started",
        "inference",
        "written",
        "delivered",
    ]
    assert (ARTEFACTS / "dashboard-cluster.png").stat().st_size > 10_000
    node.stop()
