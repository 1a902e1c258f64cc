"""The inference worker: a process of its own, results on disk, crashes survived."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.scu import send
from tests.support.dicomfiles import CORPUS_SOURCE_WARNINGS, dciodvfy
from tests.support.node import NodeProcess, plugin_env
from tests.support.paths import corpus_ct

pytestmark = pytest.mark.integration

RULE = {"algorithm": "example-threshold", "series": {"modality": ["CT"], "min_slices": 20}}
FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}


def worker_pid(node: NodeProcess) -> int:
    """The pid of the node's current worker, as its supervisor logged it."""
    started = re.findall(r"started inference worker \S+ \(pid (\d+)\)", node.log())
    return int(started[-1])


def inference_job(node: NodeProcess):
    rows = node.query("SELECT id, state, attempts, error FROM jobs WHERE kind = 'inference'")
    return rows[0] if rows else None


def wait_state(node: NodeProcess, state: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = inference_job(node)
        if job is not None and job["state"] == state:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job not {state}: {dict(inference_job(node) or {})}\n{node.log()}")


def plugin_node(make_node, settings: dict, **more) -> NodeProcess:
    """A node routing CT to the example plugin, with these plugin settings."""
    return make_node(
        assembly=FAST,
        routing={"rules": [RULE]},
        algorithms={"example-threshold": settings},
        env=plugin_env(),
        **more,
    )


def test_worker_runs_a_routed_job_and_keeps_the_result(make_node, corpus: Path) -> None:
    node = plugin_node(make_node, {"threshold": 300})
    send(corpus_ct(corpus), "127.0.0.1", node.port)
    job = wait_state(node, "succeeded")
    (row,) = node.query("SELECT algorithm, path FROM results WHERE job_id = ?", (job["id"],))
    result = json.loads((node.data_dir / row["path"]).read_text())
    assert result["algorithm"] == "example-threshold"
    assert result["measurements"]["above threshold volume_ml"] > 10
    assert "loaded example-threshold 1.0 on cpu" in node.log()
    # The real CT's result as DICOM, in its study, valid.
    outputs = node.outputs()
    assert set(outputs) == {"SEG", "SR"}
    for path in outputs.values():
        assert dciodvfy(path, from_source=CORPUS_SOURCE_WARNINGS) == [], path.name
    seg = dcmread(outputs["SEG"])
    assert seg.StudyInstanceUID == dcmread(corpus_ct(corpus)[0]).StudyInstanceUID
    # With no destination, status says where they are.
    status = node.status()
    assert "results written as DICOM: 1 SEG, 1 SR" in status
    assert str(outputs["SEG"]) in status


def test_killed_worker_does_not_stop_reception_and_the_job_is_retried(
    make_node, corpus: Path, tmp_path: Path
) -> None:
    node = plugin_node(make_node, {"delay_s": 4})
    send(corpus_ct(corpus), "127.0.0.1", node.port)
    wait_state(node, "running")
    os.kill(worker_pid(node), signal.SIGKILL)
    # Reception goes on while the worker is dead and while it restarts.
    other = write_ct_series(tmp_path / "other", CtPhantomSpec(slices=5, rows=32, columns=32))
    assert len(send(other, "127.0.0.1", node.port).sent) == 5
    job = wait_state(node, "succeeded")
    assert job["attempts"] == 2
    assert "died (signal 9)" in node.log()
    assert node.stop() == 0


def test_a_failing_algorithm_fails_its_job_with_the_reason(make_node, corpus: Path) -> None:
    node = plugin_node(make_node, {"threshold": "not a number"}, worker={"max_attempts": 2})
    send(corpus_ct(corpus), "127.0.0.1", node.port)
    job = wait_state(node, "failed")
    assert job["attempts"] == 2
    assert "ValueError" in job["error"] and "not a number" in job["error"]


def test_worker_does_not_outlive_a_killed_node(make_node) -> None:
    """SIGKILL gives the node no chance to stop its worker: the worker must notice, or an
    orphan would go on claiming jobs beside the worker of the restarted node."""
    node = make_node(assembly=FAST)
    deadline = time.monotonic() + 30
    while "started inference worker" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = worker_pid(node)
    node.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"worker {pid} outlived its node")
