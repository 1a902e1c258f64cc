"""A modality for failure tests: it sends small CT studies with dcmtk storescu, remembers what
was acknowledged with Success (and sends the rest again later, as a modality does), and the
exactly-once check of a study at a folder destination (tests/test_crash_loop.py,
tests/test_cluster_outages.py)."""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.testing import dcmtk_env
from tests.support.dicomfiles import storescu_acknowledged
from tests.support.node import NodeProcess
from tests.support.peers import require_tool


@dataclass
class Study:
    uid: str
    files: list[Path]
    acknowledged: set[Path] = field(default_factory=set)

    @property
    def outstanding(self) -> list[Path]:
        return [path for path in self.files if path not in self.acknowledged]


@dataclass
class Modality:
    """Sends studies with storescu and remembers what was acknowledged with Success."""

    folder: Path
    studies: list[Study] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def new_study(self, rng: random.Random, slices: tuple[int, int] = (8, 24)) -> Study:
        uid = generate_uid()
        spec = CtPhantomSpec(
            slices=rng.randint(*slices),
            rows=64,
            columns=64,
            pixel_spacing_mm=(5.0, 5.0),
            slice_thickness_mm=5.0,
            study_uid=uid,
        )
        study = Study(uid, write_ct_series(self.folder / f"study{len(self.studies)}", spec))
        self.studies.append(study)
        return study

    @property
    def outstanding(self) -> list[Path]:
        return [path for study in self.studies for path in study.outstanding]

    def start_sending(self, node: NodeProcess) -> None:
        files = self.outstanding
        command = [require_tool("storescu"), "-v", "-aet", "MODALITY", "-aec", "DICOMNODE"]
        self.proc = subprocess.Popen(
            [*command, "127.0.0.1", str(node.port), *map(str, files)],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish_sending(self, timeout_s: float = 120) -> int:
        """Wait for storescu to end (done, or cut off by the kill); record what it saw
        acknowledged. Its exit status."""
        assert self.proc is not None
        output, _ = self.proc.communicate(timeout=timeout_s)
        acknowledged = set(storescu_acknowledged(output))
        for study in self.studies:
            study.acknowledged |= acknowledged & set(study.files)
        return self.proc.returncode

    def send(self, node: NodeProcess) -> int:
        """Send what is outstanding and wait for storescu; its exit status."""
        self.start_sending(node)
        return self.finish_sending()


def settled(node: NodeProcess, studies: list[Study]) -> bool:
    """Every study complete, no job queued or running, every delivery sent."""
    open_studies = node.query(
        "SELECT COUNT(*) FROM studies WHERE completed_at IS NULL"
        f" AND study_uid IN ({','.join('?' * len(studies))})",
        tuple(s.uid for s in studies),
    )[0][0]
    busy = node.query("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")[0][0]
    undelivered = node.query("SELECT COUNT(*) FROM deliveries WHERE state != 'sent'")[0][0]
    return open_studies == 0 and busy == 0 and undelivered == 0


def unsettled(node: NodeProcess) -> str:
    """What keeps the node from being :func:`settled`, for a failure's message."""
    jobs = node.query(
        "SELECT id, kind, state, attempts, worker, error FROM jobs"
        " WHERE state IN ('queued', 'running')"
    )
    deliveries = node.query("SELECT id, job_id, state FROM deliveries WHERE state != 'sent'")
    return f"jobs {[tuple(j) for j in jobs]}, deliveries {[tuple(d) for d in deliveries]}"


def check_one_result_set(node: NodeProcess, outbox: Path, study: Study) -> None:
    """The study's one job, its one delivery, and exactly its objects at the destination
    (byte for byte the node's copies of what the job recorded)."""
    name = f"study {study.uid}"
    series_uid = dcmread(study.files[0], stop_before_pixels=True).SeriesInstanceUID
    jobs = node.query(
        "SELECT id, generation, state FROM jobs WHERE kind = 'inference' AND subject_uid = ?",
        (series_uid,),
    )
    assert [(j["generation"], j["state"]) for j in jobs] == [(1, "succeeded")], (
        f"{name}: inference jobs {[tuple(j) for j in jobs]} (completed more than once?)"
    )
    (job_id,) = (j["id"] for j in jobs)
    deliveries = node.query("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))
    assert [d["state"] for d in deliveries] == ["sent"], name
    outputs = node.query(
        "SELECT sop_instance_uid, kind, path FROM outputs WHERE job_id = ?", (job_id,)
    )
    assert sorted(o["kind"] for o in outputs) == ["SEG", "SR"], (
        f"{name}: outputs {[tuple(o) for o in outputs]}"
    )

    files = sorted((outbox / study.uid).rglob("*.dcm"))
    at_destination = {}
    for path in files:
        ds = dcmread(path)  # complete and readable, pixel data included
        assert path.name == f"{ds.SOPInstanceUID}.dcm", path
        assert path.parent.name == ds.SeriesInstanceUID and ds.StudyInstanceUID == study.uid
        at_destination[str(ds.SOPInstanceUID)] = (path, ds)
    assert len(at_destination) == len(files)
    assert set(at_destination) == {o["sop_instance_uid"] for o in outputs}, (
        f"{name}: at the destination {sorted(at_destination)}, the job recorded"
        f" {sorted(o['sop_instance_uid'] for o in outputs)}"
    )
    for output in outputs:
        path, ds = at_destination[output["sop_instance_uid"]]
        assert path.read_bytes() == (node.data_dir / output["path"]).read_bytes(), name
        if output["kind"] == "SEG":
            # Made from the whole series, not from what had arrived before a kill.
            assert int(ds.NumberOfFrames) == len(study.files), name


def check_every_study_once(node: NodeProcess, outbox: Path, studies: list[Study]) -> None:
    """Every file sent was acknowledged, is stored as sent, and every study has exactly its
    one result set at ``outbox``; no job failed, no partial file, nothing else there."""
    assert all(not s.outstanding for s in studies), "a file sent was never acknowledged"
    node.assert_kept((p for s in studies for p in s.files), byte_identical=True)
    failed = node.query("SELECT id, error FROM jobs WHERE state = 'failed'")
    assert not failed, [tuple(r) for r in failed]
    delivered = list(outbox.rglob("*"))
    assert not [p for p in delivered if p.name.endswith(".partial")], "a partial file was left"
    assert {p.name for p in outbox.iterdir()} == {s.uid for s in studies}
    for study in studies:
        check_one_result_set(node, outbox, study)
