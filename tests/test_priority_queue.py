"""The queue by priority in a real node: a stat radiograph goes before routine CTs queued
earlier, a routine job still runs under a stream of stat jobs, and the C-STORE request's
Priority sent by a real SCU is what a rule matches. Order is read from the jobs' recorded
times, never from the wall clock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage

from dicom_node.phantoms import CtPhantomSpec, CxrPhantomSpec, cxr_dataset, write_ct_series
from dicom_node.scu import send
from tests.support.audit import read_trail
from tests.support.http import get_json, metrics
from tests.support.node import NodeProcess, plugin_env, wait_until

pytestmark = pytest.mark.integration

FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
SMALL_CT = CtPhantomSpec(slices=3, rows=32, columns=32)
# PS3.7 9.1.1.1 Priority codes.
HIGH, MEDIUM = 0x0001, 0x0000


def small_ct(folder: Path) -> list[Path]:
    return write_ct_series(folder, SMALL_CT)


def small_cxr(folder: Path) -> list[Path]:
    """A radiograph the example plugin can place in space (it outlines a volume): the CR
    phantom with a plane, pixel spacing and frame of reference."""
    ds = cxr_dataset(CxrPhantomSpec(rows=64, columns=64))
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.FrameOfReferenceUID = generate_uid()
    folder.mkdir(parents=True)
    path = folder / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def send_with_priority(paths: list[Path], port: int, priority: int) -> None:
    """C-STORE with the request's Priority set (PS3.7 9.1.1.1), as pynetdicom sends it: dcmtk's
    storescu always sends MEDIUM."""
    ae = AE(ae_title="ED_SCANNER")
    for sop_class in (CTImageStorage, ComputedRadiographyImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for path in paths:
            status = assoc.send_c_store(dcmread(path), priority=priority)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def inference_jobs(node: NodeProcess) -> list[dict]:
    return [
        dict(row)
        for row in node.query(
            "SELECT id, subject_uid, priority, state, created_at, started_at FROM jobs"
            " WHERE kind = 'inference' ORDER BY id"
        )
    ]


def finished(node: NodeProcess, count: int) -> list[dict]:
    jobs = inference_jobs(node)
    done = [j for j in jobs if j["state"] in ("succeeded", "failed")]
    return jobs if len(jobs) == count and len(done) == count else []


def test_a_stat_radiograph_starts_before_routine_cts_queued_earlier(
    make_node, tmp_path: Path
) -> None:
    node = make_node(
        assembly=FAST,
        routing={
            "rules": [
                {"algorithm": "example-threshold", "series": {"modality": ["CT"]}},
                {
                    "algorithm": "example-threshold",
                    "series": {"modality": ["CR", "DX"]},
                    "priority": "stat",
                },
            ]
        },
        # Each job takes 4 s: the first CT is still running when the radiograph is routed.
        algorithms={"example-threshold": {"delay_s": 4}},
        env=plugin_env(),
    )
    for name in ("ct1", "ct2", "ct3"):
        send(small_ct(tmp_path / name), "127.0.0.1", node.port)
    wait_until(
        lambda: (
            len(inference_jobs(node)) == 3
            and any(j["state"] == "running" for j in inference_jobs(node))
        ),
        what="three routine CT jobs, one running",
        log=node.log(),
    )
    send(small_cxr(tmp_path / "cxr"), "127.0.0.1", node.port)
    jobs = wait_until(lambda: finished(node, 4), 120, "all four jobs to finish", node.log())

    (cxr,) = [j for j in jobs if j["priority"] == "stat"]
    routine = [j for j in jobs if j["priority"] == "routine"]
    assert len(routine) == 3
    # The routine CTs that were still waiting when the radiograph's job was queued ...
    waiting = [j for j in routine if j["started_at"] > cxr["created_at"]]
    assert len(waiting) == 2, (cxr, routine)
    assert all(j["id"] < cxr["id"] for j in waiting)  # queued earlier
    # ... started after it.
    assert all(cxr["started_at"] < j["started_at"] for j in waiting), (cxr, waiting)
    assert {j["state"] for j in jobs} == {"succeeded"}, node.log()

    # The priority is shown wherever jobs are: the API, `dicom-node jobs`, status, metrics,
    # the audit trail.
    status, listed = get_json(node.http_url + "/api/jobs")
    assert status == 200
    assert {j["id"]: j["priority"] for j in listed} == {j["id"]: j["priority"] for j in jobs}
    listing = subprocess.run(
        [sys.executable, "-m", "dicom_node", "jobs", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"job {cxr['id']:>5}  example-threshold    stat    succeeded" in listing
    seen = metrics(node.http_url)
    key = (("kind", "inference"), ("priority", "stat"), ("state", "succeeded"))
    assert seen[("dicom_node_jobs", key)] == 1
    assert seen[("dicom_node_inference_queue_depth", (("priority", "stat"),))] == 0
    trail = read_trail(node.data_dir / "audit" / "audit.jsonl")
    routed = [
        m["EventIdentification"]["EventOutcomeDescription"]
        for m in trail
        if m["EventIdentification"]["EventID"]["csd-code"] == "110103"
    ]
    assert f"series routed: example-threshold as job {cxr['id']}, priority stat" in routed
    assert len(routed) == 4


def timeline(jobs: list[dict]) -> str:
    """The jobs' recorded times from the first one queued, for a failure's message."""
    t0 = min(j["created_at"] for j in jobs)
    return "\n".join(
        f"job {j['id']:>3} {j['priority']:<7} queued {j['created_at'] - t0:6.2f}"
        f" started {j['started_at'] - t0:6.2f}"
        for j in jobs
    )


def test_a_routine_job_still_runs_under_a_stream_of_stat_jobs(make_node, tmp_path: Path) -> None:
    """Series sent with the C-STORE Priority HIGH are stat; MEDIUM ones routine. A stream of
    stat series keeps stat jobs waiting; aging (2 x 4 s) lets the routine job go first as the
    oldest before the stream ends."""
    node = make_node(
        assembly=FAST,
        routing={
            "rules": [
                {
                    "algorithm": "example-threshold",
                    "series": {"modality": ["CT"], "request_priority": ["HIGH"]},
                    "priority": "stat",
                },
                {
                    "algorithm": "example-threshold",
                    "series": {"modality": ["CT"], "request_priority": ["MEDIUM", "LOW"]},
                },
            ]
        },
        algorithms={"example-threshold": {"delay_s": 1}},
        worker={"priority_aging_s": 4},
        env=plugin_env(),
    )
    # A first job warms the worker, so that the times below are the queue's, not its start.
    send_with_priority(small_ct(tmp_path / "warm-up"), node.port, HIGH)
    wait_until(lambda: finished(node, 1), 120, "the warm-up job", node.log())
    # A stat job to keep the worker busy, the routine one, then stat series arriving faster
    # than the worker takes them (a job is 1 s and its writing).
    send_with_priority(small_ct(tmp_path / "stat-0"), node.port, HIGH)
    send_with_priority(small_ct(tmp_path / "routine"), node.port, MEDIUM)
    streamed = 16
    for n in range(1, streamed + 1):
        send_with_priority(small_ct(tmp_path / f"stat-{n}"), node.port, HIGH)
        time.sleep(0.5)
    jobs = wait_until(lambda: finished(node, streamed + 3), 240, "every job to finish", node.log())
    assert {j["state"] for j in jobs} == {"succeeded"}, node.log()

    # The request's Priority as sent, per instance, and the class the rules gave.
    priorities = dict(
        node.query("SELECT series_uid, MAX(request_priority) FROM instances GROUP BY series_uid")
    )
    for job in jobs:
        sent = priorities[job["subject_uid"]]
        assert (sent, job["priority"]) in {("HIGH", "stat"), ("MEDIUM", "routine")}
    (routine,) = [j for j in jobs if j["priority"] == "routine"]
    stat = [j for j in jobs if j["priority"] == "stat"]
    # Stat jobs queued after the routine one went before it: it was not simply first in ...
    assert any(
        j["created_at"] > routine["created_at"] and j["started_at"] < routine["started_at"]
        for j in stat
    ), timeline(jobs)
    # ... and it ran while stat jobs queued before its start were still waiting: it did not
    # wait for the stream to end.
    assert any(j["created_at"] < routine["started_at"] < j["started_at"] for j in stat), timeline(
        jobs
    )
