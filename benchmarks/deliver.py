"""Delivery latency: from the last source instance acknowledged to the last result stored in
a real PACS (Orthanc, Debian), per algorithm, with demo weights on the CPU.

Columns: total (acknowledged to stored), complete (acknowledged to the series or study
counting as complete: at once when the sending association is released, else after the quiet
window), the algorithm's own run time and the DICOM writing (from the worker's log), and the
node's overhead after completion: total minus completion minus the algorithm's run time, i.e.
routing, job pickup, reading the series, DICOM writing, delivery and the PACS storing it.
The peer figure is dcmtk storescu sending the same result files to the same Orthanc: the
floor any sender pays.

    python -m benchmarks.deliver [--quiet 1.0] [--repeat 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from dicom_node.phantoms import (
    BrainPhantomSpec,
    CtPhantomSpec,
    CxrPhantomSpec,
    Nodule,
    cxr_dataset,
    write_brain_study,
    write_ct_series,
)
from dicom_node.scu import send
from dicom_node.testing import Orthanc, ServeProcess, dcmtk_env, dcmtk_tool, free_port

RAN = re.compile(r"job (\d+): (\S+) ran in ([\d.]+) s, wrote .* in ([\d.]+) s")


def cases(folder: Path) -> dict[str, list[Path]]:
    """Per algorithm: a clinically sized phantom study."""
    ct = write_ct_series(
        folder / "ct",
        CtPhantomSpec(slices=160, noise_hu=20, nodules=(Nodule((-60.0, 10.0, 100.0), 9.0),)),
    )
    brain = BrainPhantomSpec(frames=155, rows=240, columns=240, spacing_mm=(1.0, 1.0, 1.0))
    write_brain_study(folder / "mr", brain)
    mr = sorted(p for p in (folder / "mr").rglob("*") if p.is_file())
    cxr = folder / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=2048, columns=2048, opacity=True)).save_as(
        cxr, enforce_file_format=True
    )
    return {"lung-nodules-ct": ct, "brain-tumour-mr": mr, "pneumonia-cxr": [cxr]}


def storescu_s(orthanc: Orthanc, files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            dcmtk_tool("storescu") or "storescu",
            "-R",  # propose exactly the files' SOP classes and transfer syntaxes
            "-aec",
            orthanc.aet,
            "127.0.0.1",
            str(orthanc.dicom_port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


COLUMNS = ("total_s", "complete_s", "model_s", "writing_s", "overhead_s", "storescu_s")


def run(quiet: float = 1.0, repeat: int = 2) -> dict[str, dict[str, float]]:
    """Per algorithm, best of ``repeat``: the figures named in :data:`COLUMNS`, in seconds."""
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        orthanc = Orthanc(scratch / "orthanc", dicom_port=free_port())
        (scratch / "node").mkdir()
        node = ServeProcess(
            scratch / "node",
            {
                "assembly": {"series_quiet_seconds": quiet, "study_quiet_seconds": quiet},
                "peers": {orthanc.aet: {"host": "127.0.0.1", "port": orthanc.dicom_port}},
                "routing": {"destinations": ["sender"]},
                "delivery": {"poll_s": 0.05},
            },
        )
        node.start(timeout_s=60)
        orthanc.modalities = {"node": ["DICOMNODE", "127.0.0.1", node.port]}
        orthanc.start()
        rows = []
        try:
            runs = [cases(scratch / f"run{i}") for i in range(repeat)]  # new UIDs each
            for name in runs[0]:
                best = None
                for run in runs:
                    sources = run[name]
                    last_job = node.query("SELECT COALESCE(MAX(id), 0) FROM jobs")[0][0]
                    report = send(sources, "127.0.0.1", node.port, calling_aet=orthanc.aet)
                    acknowledged = time.time()
                    assert not report.failed, report.failed
                    # Sent = every result acknowledged as stored by the PACS (C-STORE status).
                    done = (
                        "SELECT MAX(d.sent_at) FROM deliveries d JOIN jobs j ON j.id = d.job_id"
                        f" WHERE j.kind = 'inference' AND j.id > {last_job} AND d.state = 'sent'"
                    )
                    while (sent_at := node.query(done)[0][0]) is None:
                        time.sleep(0.02)
                    total = sent_at - acknowledged
                    (job, _, ran, wrote) = RAN.findall(node.log())[-1]
                    # The series (or, for a study rule, the study) completed when the
                    # completion job that led to this inference job was recorded.
                    completed = node.query(
                        "SELECT c.created_at FROM jobs c JOIN jobs i ON i.id = ?"
                        " AND c.subject_uid = i.subject_uid AND c.generation = i.generation"
                        " AND c.kind != 'inference'",
                        (int(job),),
                    )[0][0]
                    overhead = sent_at - completed - float(ran)
                    if best is None or overhead < best[4]:
                        best = (total, completed - acknowledged, float(ran), float(wrote), overhead)
                    outputs = [
                        node.data_dir / r["path"]
                        for r in node.query(
                            "SELECT path FROM outputs WHERE job_id = ?", (int(job),)
                        )
                    ]
                rows.append((name, *best, storescu_s(orthanc, outputs)))
                print(name, *(f"{v:.3f}" for v in rows[-1][1:]), flush=True)  # as it comes
        finally:
            node.stop()
            orthanc.stop()
    return {name: dict(zip(COLUMNS, figures, strict=True)) for name, *figures in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", type=float, default=1.0, help="series/study quiet seconds")
    parser.add_argument("--repeat", type=int, default=2, help="runs per algorithm; best kept")
    args = parser.parse_args()
    figures = run(args.quiet, args.repeat)
    print(f"quiet window {args.quiet:.1f} s; best of {args.repeat}; demo weights, CPU")
    print(
        f"{'algorithm':<18} {'total s':>8} {'complete s':>10} {'model s':>8} {'writing s':>9}"
        f" {'overhead s':>10} {'storescu s':>10}"
    )
    for name, row in figures.items():
        total, complete, ran, wrote, overhead, peer = row.values()
        print(
            f"{name:<18} {total:8.2f} {complete:10.2f} {ran:8.2f} {wrote:9.2f}"
            f" {overhead:10.2f} {peer:10.2f}"
        )


if __name__ == "__main__":
    main()
