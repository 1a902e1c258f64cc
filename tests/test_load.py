"""Load: eight modalities send at once while inference runs, and nothing acknowledged is lost.

Eight dcmtk storescu senders (separate processes, as separate modalities are) each send 200
small CT instances: two studies of two series (60 + 40 slices), one association per study.
A routed example-threshold job is running when they start, and every 60-slice series they
send is routed too, so the worker competes with ingest for the CPU throughout. Afterwards:

- every instance acknowledged with Success is in the index, and its file exists and holds
  the data set exactly as sent;
- every study completed, once (its association carried only it), with all of its instances;
- the routed series' jobs all succeeded.

The ingest rate (instances acknowledged per second over the whole run, first send to last
response) is printed and written to ``test-artefacts/load.json``; it is never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.scu import send
from dicom_node.testing import dcmtk_env
from tests.support.dicomfiles import storescu_acknowledged
from tests.support.node import NodeProcess, plugin_env
from tests.support.peers import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artefacts"
SENDERS = 8
SERIES_SLICES = (60, 40)  # per study; two studies per sender: 200 instances
STUDIES_PER_SENDER = 2
ROUTED_MIN_SLICES = 50  # the 60-slice series are routed, the 40-slice ones are not
PRIMER_DELAY_S = 1.0  # each example-plugin run: the primer overlaps the senders' start


def sender_studies(folder: Path, sender: int) -> list[list[Path]]:
    """The files of each study one sender sends (one association per study)."""
    studies = []
    for number in range(STUDIES_PER_SENDER):
        study_uid = generate_uid()
        files: list[Path] = []
        for series, slices in enumerate(SERIES_SLICES):
            spec = CtPhantomSpec(
                slices=slices,
                rows=64,
                columns=64,
                pixel_spacing_mm=(5.0, 5.0),
                slice_thickness_mm=5.0,
                study_uid=study_uid,
                patient_id=f"LOAD-{sender}",
            )
            files += write_ct_series(folder / f"sender{sender}" / f"{number}-{series}", spec)
        studies.append(files)
    return studies


def run_sender(node: NodeProcess, sender: int, studies: list[list[Path]]) -> subprocess.Popen:
    """One modality: its studies one after the other, each in an association of its own."""
    script = " && ".join(shlex.join(storescu_command(node, sender, files)) for files in studies)
    return subprocess.Popen(
        ["sh", "-c", script],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def storescu_command(node: NodeProcess, sender: int, files: list[Path]) -> list[str]:
    return [
        require_tool("storescu"),
        "-v",
        "-aet",
        f"MODALITY{sender}",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.port),
        *map(str, files),
    ]


def study_completions(node: NodeProcess, study_uid: str, timeout_s: float = 60) -> list:
    """(generation, instances) of each completion of a study, once it has one."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = node.query(
            "SELECT generation, json_extract(payload, '$.instances') AS n FROM jobs"
            " WHERE kind = 'study-complete' AND subject_uid = ? ORDER BY generation",
            (study_uid,),
        )
        if rows or time.monotonic() > deadline:
            return [(r["generation"], r["n"]) for r in rows]
        time.sleep(0.1)


def test_eight_senders_while_inference_runs_lose_nothing(make_node, tmp_path: Path) -> None:
    rule = {
        "algorithm": "example-threshold",
        "series": {"modality": ["CT"], "min_slices": ROUTED_MIN_SLICES},
    }
    node = make_node(
        routing={"rules": [rule]},
        algorithms={"example-threshold": {"delay_s": PRIMER_DELAY_S}},
        env=plugin_env(),
    )
    plan = {sender: sender_studies(tmp_path / "studies", sender) for sender in range(SENDERS)}
    total = sum(len(files) for studies in plan.values() for files in studies)
    assert total == SENDERS * 200

    # A job in progress when the load begins.
    primer = write_ct_series(
        tmp_path / "primer", CtPhantomSpec(slices=ROUTED_MIN_SLICES, rows=64, columns=64)
    )
    assert len(send(primer, "127.0.0.1", node.port).sent) == len(primer)
    running = "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND state = 'running'"
    assert node.wait_for(running, 1, timeout_s=60) == 1, node.log()
    (primer_job,) = node.query("SELECT id FROM jobs WHERE kind = 'inference'")

    started = time.monotonic()
    senders = {sender: run_sender(node, sender, studies) for sender, studies in plan.items()}
    outputs = {sender: proc.communicate(timeout=600)[0] for sender, proc in senders.items()}
    elapsed = time.monotonic() - started

    acknowledged: list[Path] = []
    for sender, output in outputs.items():
        assert senders[sender].returncode == 0, f"sender {sender}:\n{output[-3000:]}"
        acked = storescu_acknowledged(output)
        sent = [path for files in plan[sender] for path in files]
        assert acked == sent, f"sender {sender}: {len(sent) - len(acked)} not acknowledged"
        acknowledged += acked
    rate = len(acknowledged) / elapsed

    # Reported before anything else is checked, so a failing run still says how fast it was.
    primer_study = dcmread(primer[0], stop_before_pixels=True).StudyInstanceUID
    ((first, last),) = node.query(
        "SELECT MIN(received_at), MAX(received_at) FROM instances WHERE study_uid != ?",
        (primer_study,),
    )
    overlapping = node.query(
        "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND started_at <= ?"
        " AND (finished_at IS NULL OR finished_at >= ?)",
        (last, first),
    )[0][0]
    report = {
        "senders": SENDERS,
        "instances": len(acknowledged),
        "instance_bytes": acknowledged[0].stat().st_size,
        "seconds": round(elapsed, 3),
        "instances_per_s": round(rate, 1),
        "inference_jobs_running_during_ingest": overlapping,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    ARTEFACTS.mkdir(exist_ok=True)
    (ARTEFACTS / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\ningest under load: {len(acknowledged)} instances from {SENDERS} senders in"
        f" {elapsed:.1f} s = {rate:.0f} instances/s; {overlapping} inference job(s) ran while"
        " they arrived"
    )

    # Nothing acknowledged is lost: indexed, on disk, the data set exactly as sent.
    node.assert_kept(acknowledged, byte_identical=True)

    # The primer ran while instances arrived: the load really met inference.
    (window,) = node.query(
        "SELECT started_at, finished_at FROM jobs WHERE id = ?", (primer_job["id"],)
    )
    assert window["started_at"] <= last and (window["finished_at"] or last) >= first, (
        "no instance arrived while the primer job ran"
    )

    # Every study completed once (its association carried only it), with all its instances.
    for sender, studies in plan.items():
        for files in studies:
            study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            assert study_completions(node, study_uid) == [(1, len(files))], (
                f"sender {sender}: study {study_uid} did not complete once with all instances"
            )
    routed = 1 + SENDERS * STUDIES_PER_SENDER
    succeeded = "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND state = 'succeeded'"
    assert node.wait_for(succeeded, routed, timeout_s=300) == routed, node.log()[-5000:]
    assert node.stop() == 0
