"""Fetching what a study lacks (issue 19 part 2), against a real Orthanc as Query/Retrieve SCP
(C-FIND, then C-MOVE or C-GET) and as DICOMweb origin (QIDO-RS, then WADO-RS).

The node is sent three of a brain MR study's four sequences; Orthanc holds the whole study.
The brain rule lacks FLAIR, asks Orthanc, and only the FLAIR series is fetched, marked as
retrieved, and the study routed with all four roles; its decisions say what was asked for and
what came."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from dicom_node.testing import missing_orthanc
from tests.support.audit import event_id, objects, read_trail
from tests.support.cases import mr_series
from tests.support.node import wait_until
from tests.support.retrieve import ROLES, brain_pacs, decisions, retrieving_node, wait_routed

pytestmark = pytest.mark.integration

METHODS = ("c-get", "c-move", "dicomweb")
SENT = ("T1c", "T1", "T2")


@pytest.fixture(scope="module", autouse=True)
def orthanc_ready() -> None:
    lacking = missing_orthanc()
    if lacking:
        pytest.fail(f"the retrieval tests need: {', '.join(lacking)}")


def retrieval_jobs(node, study_uid: str) -> list:
    return node.query(
        "SELECT id, state, attempts, error FROM jobs WHERE kind = 'retrieve'"
        " AND subject_uid = ? ORDER BY id",
        (study_uid,),
    )


def send_three(node, pacs) -> None:
    files = [path for role in SENT for path in pacs.files[role]]
    result = node.storescu(files=files)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("method", METHODS)
def test_the_missing_flair_is_fetched_marked_and_the_study_routed(
    make_node, tmp_path: Path, method: str
) -> None:
    pacs = brain_pacs(tmp_path / "pacs")
    node = retrieving_node(make_node, pacs, method)
    orthanc = pacs.start(node.port)
    try:
        send_three(node, pacs)
        routed = wait_routed(node, pacs.study_uid)
    finally:
        orthanc.stop()

    (brain,) = [r for r in routed["routed"] if r["algorithm"] == "brain-tumour-mr"]
    assert brain["inputs"] == pacs.series, "all four roles, FLAIR the series fetched"
    assert brain["senders"] == ["STORESCU"], "results go back to who sent, not to the PACS"
    (job,) = retrieval_jobs(node, pacs.study_uid)
    assert job["state"] == "succeeded" and job["attempts"] == 1, job["error"]
    # What came, recorded by the decision that routed it.
    (seen,) = brain["asked"]["retrievals"]
    assert brain["asked"]["roles"] == ["FLAIR"] and brain["asked"]["sources"] == ["pacs"]
    assert seen["job_id"] == job["id"] and seen["state"] == "succeeded"
    assert seen["came_series"] == [pacs.series["FLAIR"]]
    assert seen["came_instances"] == len(pacs.files["FLAIR"])

    # The first decision asked, and was told afterwards what came.
    first = decisions(node, pacs.study_uid)[0]
    (asked,) = [n for n in first["not_routed"] if n["algorithm"] == "brain-tumour-mr"]
    assert asked["reason"].startswith("missing role(s) FLAIR: asked pacs")
    assert asked["asked"]["roles"] == ["FLAIR"]
    assert asked["asked"]["retrievals"][0]["came_series"] == [pacs.series["FLAIR"]]

    # The study as the dashboard shows it: the series fetched, and from whom (its AE title,
    # or for DICOMweb the source's name).
    source = "pacs" if method == "dicomweb" else "ORTHANC"
    shown = requests.get(f"{node.http_url}/api/studies/{pacs.study_uid}", timeout=30).json()
    fetched = {s["series_uid"]: s["fetched_from"] for s in shown["series"]}
    assert fetched == {
        uid: (source if role == "FLAIR" else None) for role, uid in pacs.series.items()
    }

    # Only the missing series was fetched, and every instance of it is marked as retrieved.
    rows = node.query(
        "SELECT series_uid, peer_host, COUNT(*) AS n FROM instances WHERE study_uid = ?"
        " GROUP BY series_uid, peer_host",
        (pacs.study_uid,),
    )
    marks = {(r["series_uid"], r["peer_host"]): r["n"] for r in rows}
    mark = f"retrieved:{job['id']}"
    assert marks[(pacs.series["FLAIR"], mark)] == len(pacs.files["FLAIR"])
    assert sum(n for (series, host), n in marks.items() if host == mark) == len(pacs.files["FLAIR"])
    assert {series for series, _ in marks} == set(pacs.series.values())

    # Audited as instances transferred from Orthanc (C-MOVE: by the SCP that received them),
    # named as above.
    transferred = [
        m
        for m in read_trail(node.data_dir / "audit" / "audit.jsonl")
        if event_id(m) == "DICOM Instances Transferred"
        and objects(m).get("Study Instance UID") == pacs.study_uid
        and any(p.get("UserID") == source for p in m["ActiveParticipant"])
    ]
    assert transferred, "the retrieval is in the audit trail"

    # Routed once: one inference job, queued (no worker here).
    jobs = node.query(
        "SELECT state FROM jobs WHERE kind = 'inference' AND subject_uid = ?", (pacs.study_uid,)
    )
    assert [j["state"] for j in jobs] == ["queued"]
    assert set(ROLES) == set(brain["inputs"])


def test_an_unreachable_pacs_is_asked_again_until_it_answers(make_node, tmp_path: Path) -> None:
    pacs = brain_pacs(tmp_path / "pacs")
    node = retrieving_node(make_node, pacs, "c-get")
    send_three(node, pacs)  # Orthanc is down

    def failed_once() -> bool:
        jobs = retrieval_jobs(node, pacs.study_uid)
        return bool(jobs) and jobs[0]["attempts"] >= 2 and jobs[0]["state"] == "queued"

    wait_until(failed_once, 60, "two failed attempts while Orthanc is down", node.log())
    (job,) = retrieval_jobs(node, pacs.study_uid)
    assert "SourceUnavailable" in job["error"]
    assert not any(
        r["algorithm"] == "brain-tumour-mr"
        for d in decisions(node, pacs.study_uid)
        for r in d["routed"]
    )

    orthanc = pacs.start(node.port)
    try:
        routed = wait_routed(node, pacs.study_uid)
    finally:
        orthanc.stop()
    (job,) = retrieval_jobs(node, pacs.study_uid)
    assert job["state"] == "succeeded" and job["attempts"] >= 3
    (brain,) = [r for r in routed["routed"] if r["algorithm"] == "brain-tumour-mr"]
    assert brain["inputs"]["FLAIR"] == pacs.series["FLAIR"]


def test_a_study_lacking_a_role_the_pacs_lacks_too_is_asked_once(make_node, tmp_path: Path) -> None:
    """Orthanc holds only what the node has: the retrieval finds nothing to fetch, the
    decision that asked says so, and later completions of the study never ask again."""
    pacs = brain_pacs(tmp_path / "pacs")
    node = retrieving_node(make_node, pacs, "c-get")
    orthanc = pacs.start(node.port)
    try:
        for instance in orthanc.get(f"/series/{_orthanc_series(orthanc, pacs)}/instances"):
            orthanc_delete(orthanc, f"/instances/{instance['ID']}")
        send_three(node, pacs)

        def ended() -> list:
            jobs = retrieval_jobs(node, pacs.study_uid)
            return [j for j in jobs if j["state"] == "succeeded"]

        wait_until(ended, 60, "the retrieval to end", node.log())
        # More of the study (a localizer): a new completion, the same role missing.
        more = []
        for ds in mr_series(pacs.study_uid, "3-Plane Loc", 9, slices=2):
            more.append(tmp_path / f"loc{len(more)}.dcm")
            ds.save_as(more[-1], enforce_file_format=True)
        assert node.storescu(files=more).returncode == 0

        def decided_again() -> list:
            return [d for d in decisions(node, pacs.study_uid) if d["generation"] >= 2]

        wait_until(decided_again, 60, "the study's second decision", node.log())
    finally:
        orthanc.stop()
    assert len(retrieval_jobs(node, pacs.study_uid)) == 1, "asked once"
    first, *later = decisions(node, pacs.study_uid)
    (asked,) = first["not_routed"]
    assert asked["asked"]["retrievals"][0]["came_series"] == []
    (again,) = later[-1]["not_routed"]
    assert "not asked again" in again["reason"] and "nothing came" in again["reason"]


def _orthanc_series(orthanc, pacs) -> str:
    (found,) = orthanc.post(
        "/tools/lookup", pacs.series["FLAIR"]
    )  # Orthanc's ID of the FLAIR series
    return str(found["ID"])


def orthanc_delete(orthanc, path: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"{orthanc.url}{path}", method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
