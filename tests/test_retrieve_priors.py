"""Fetching a prior (issue 19 part 2): an algorithm that wants the patient's prior study (the
lung nodule follow-up) and finds none on the node has it fetched from a PACS, within the
prior's age, before its job is decided; the prior itself is not analysed as new work."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.testing import Orthanc, free_port, missing_orthanc
from tests.support.node import wait_until

pytestmark = pytest.mark.integration

NOW = datetime(2025, 9, 1, 10, 0)
LUNG = "lung-nodules-ct"


@pytest.fixture(scope="module", autouse=True)
def orthanc_ready() -> None:
    lacking = missing_orthanc()
    if lacking:
        pytest.fail(f"the retrieval tests need: {', '.join(lacking)}")


def chest(folder: Path, when: datetime) -> list[Path]:
    spec = CtPhantomSpec(slices=20, rows=16, columns=16, patient_id="P-FOLLOW", acquired=when)
    return write_ct_series(folder, spec)


def series_uid(node, path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@pytest.mark.parametrize("method", ["c-get", "dicomweb"])
def test_a_missing_prior_is_fetched_and_becomes_the_prior_input(
    make_node, tmp_path: Path, method: str
) -> None:
    too_old = chest(tmp_path / "old", NOW - timedelta(days=2000))  # past the prior's age
    prior = chest(tmp_path / "prior", NOW - timedelta(days=90))
    current = chest(tmp_path / "current", NOW)
    # Orthanc answers C-FIND and C-GET only to the AEs it knows (the port is for C-MOVE).
    orthanc = Orthanc(
        tmp_path / "orthanc",
        dicom_port=free_port(),
        modalities={"node": ["DICOMNODE", "127.0.0.1", free_port()]},
    ).start()
    try:
        for path in [*too_old, *prior, *current]:
            orthanc.upload(path)
        source = (
            {"method": "dicomweb", "url": f"{orthanc.url}/dicom-web"}
            if method == "dicomweb"
            else {
                "method": "c-get",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        )
        rule = {
            "algorithm": LUNG,
            "series": {"modality": ["CT"], "min_slices": 20},
            "fetch_missing": ["pacs"],
        }
        node = make_node(
            assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
            routing={"rules": [rule]},
            worker={"enabled": False},
            retrieve={"sources": {"pacs": source}, "backoff_initial_s": 0.5},
        )
        assert node.storescu(files=current).returncode == 0
        jobs = "SELECT payload FROM jobs WHERE kind = 'inference'"
        wait_until(lambda: node.query(jobs), 90, "the current CT's job", node.log())
    finally:
        orthanc.stop()

    (payload,) = [json.loads(r["payload"]) for r in node.query(jobs)]
    assert payload["inputs"] == {
        "series": series_uid(node, current[0]),
        "prior": series_uid(node, prior[0]),
    }, "one job, the current CT with the prior fetched; the prior is not analysed itself"
    (retrieval,) = node.query("SELECT id, state, payload FROM jobs WHERE kind = 'retrieve'")
    asked = json.loads(retrieval["payload"])
    assert retrieval["state"] == "succeeded" and asked["roles"] == ["prior"]
    assert asked["patient_id"] == "P-FOLLOW" and asked["dates"].endswith("20250901")
    fetched = node.query(
        "SELECT series_uid, COUNT(*) AS n FROM instances WHERE peer_host = ? GROUP BY series_uid",
        (f"retrieved:{retrieval['id']}",),
    )
    assert [(r["series_uid"], r["n"]) for r in fetched] == [
        (series_uid(node, prior[0]), len(prior))
    ], "only the prior within its age, not the older study"
    decision = node.query(
        "SELECT routed FROM routing_decisions WHERE level = 'series' AND subject_uid = ?",
        (series_uid(node, current[0]),),
    )
    (routed,) = json.loads(decision[0]["routed"])
    assert routed["prior"] == "prior: series 1 of a study 90 days earlier"
