"""Cancel and requeue, from the command line and the HTTP API, audited (issue 16, item 4).

A real node routes two CT series to the example plugin, which takes a few seconds a run:
while the first job runs and the second waits, the waiting one is cancelled from the command
line (it is never claimed) and the running one through the API (its worker is killed and
replaced: nothing of it is recorded); requeued, the cancelled job runs to the end.
"""

from __future__ import annotations

import getpass
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.scu import send
from tests.support.audit import event_id, objects, read_trail
from tests.support.http import get_json, request
from tests.support.node import NodeProcess, plugin_env

pytestmark = pytest.mark.integration

RULE = {"algorithm": "example-threshold", "series": {"modality": ["CT"]}}


def _jobs(node: NodeProcess) -> dict[str, list[int]]:
    by_state: dict[str, list[int]] = {}
    for row in node.query("SELECT id, state FROM jobs WHERE kind = 'inference' ORDER BY id"):
        by_state.setdefault(row["state"], []).append(row["id"])
    return by_state


def _wait(node: NodeProcess, condition, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what}: {_jobs(node)}\n{node.log()}")


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dicom_node", "jobs", *args, "--config", str(node.config_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _post(node: NodeProcess, path: str) -> tuple[int, dict]:
    status, body = request(node.http_url + path, method="POST")
    return status, json.loads(body)


def test_cancel_and_requeue_queued_and_running_jobs(make_node, tmp_path: Path) -> None:
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        routing={"rules": [RULE]},
        algorithms={"example-threshold": {"delay_s": 6.0}},
        env=plugin_env(),
    )
    for seed in (1, 2):
        spec = CtPhantomSpec(slices=8, rows=32, columns=32, seed=seed)
        ct = write_ct_series(tmp_path / f"ct{seed}", spec)
        assert len(send(ct, "127.0.0.1", node.port).sent) == len(ct)
    running, queued = _wait(
        node,
        lambda: (
            (j := _jobs(node)).get("running")
            and j.get("queued")
            and (j["running"][0], j["queued"][0])
        ),
        "one job running, one queued",
    )

    # The waiting job, from the command line: never claimed.
    done = _cli(node, "cancel", str(queued))
    assert done.returncode == 0, done.stderr
    assert f"job {queued} cancelled (it was queued)" in done.stdout
    # The running one, through the API: its worker's result will be refused.
    assert (
        request(node.http_url + f"/api/jobs/{running}/cancel", method="POST", json_body=False)[0]
        == 415
    )
    status, answer = _post(node, f"/api/jobs/{running}/cancel")
    assert status == 200, answer
    assert (answer["state"], answer["was"], answer["changed"]) == ("cancelled", "running", True)

    # The supervisor kills the worker in the middle of its run (the plugin's delay) and
    # starts a fresh one: nothing of the run is recorded.
    killed = f"killed: its job {running} was cancelled"
    _wait(node, lambda: killed in node.log(), "the cancelled job's worker killed")
    assert node.query("SELECT COUNT(*) FROM results")[0][0] == 0
    assert node.query("SELECT COUNT(*) FROM outputs")[0][0] == 0
    rows = {
        r["id"]: r
        for r in node.query(
            "SELECT id, state, attempts, started_at, error FROM jobs WHERE kind = 'inference'"
        )
    }
    assert rows[queued]["state"] == rows[running]["state"] == "cancelled"
    assert rows[queued]["attempts"] == 0 and rows[queued]["started_at"] is None
    assert rows[running]["error"].startswith("cancelled by http-api (127.0.0.1) while it ran")
    assert rows[queued]["error"] == f"cancelled by {getpass.getuser()} ({socket.gethostname()})"

    # What has ended cannot be cancelled; what does not exist is not found.
    again = _cli(node, "cancel", str(queued))
    assert again.returncode == 1 and "only a queued or running job" in again.stderr
    assert _post(node, f"/api/jobs/{running}/cancel")[0] == 409
    assert _post(node, "/api/jobs/99999/cancel")[0] == 404
    assert _post(node, f"/api/jobs/{queued}/requeue")[0] == 200  # queued again, by the API

    # Requeued from the command line, the running-cancelled job runs to the end, as does
    # the other.
    requeued = _cli(node, "requeue", str(running))
    assert requeued.returncode == 0, requeued.stderr
    _wait(node, lambda: _jobs(node).get("succeeded") == sorted([running, queued]), "both run", 90)
    assert node.query("SELECT COUNT(*) FROM results")[0][0] == 2
    status, job = get_json(node.http_url + f"/api/jobs/{running}")
    assert status == 200 and job["state"] == "succeeded"
    assert _cli(node, "requeue", str(running)).returncode == 1  # a succeeded job: redeliver it
    assert node.stop() == 0

    # Each change audited: a procedure record naming who asked, from where, and the job.
    trail = read_trail(node.data_dir / "audit" / "audit.jsonl")
    records = [m for m in trail if event_id(m) == "Procedure Record"]
    asked = [
        (
            m["ActiveParticipant"][0]["UserID"],
            objects(m)["URI"],
            m["EventIdentification"]["EventOutcomeDescription"].split(" (it was")[0],
        )
        for m in records
    ]
    user = getpass.getuser()
    assert asked == [
        (user, f"/api/jobs/{queued}", f"job {queued} (example-threshold) cancelled"),
        ("http-api", f"/api/jobs/{running}", f"job {running} (example-threshold) cancelled"),
        ("http-api", f"/api/jobs/{queued}", f"job {queued} (example-threshold) requeued"),
        (user, f"/api/jobs/{running}", f"job {running} (example-threshold) requeued"),
    ]
    api = [m for m in records if m["ActiveParticipant"][0]["UserID"] == "http-api"]
    assert all(m["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1" for m in api)
    assert all("Study Instance UID" in objects(m) for m in records)  # whose data it was
