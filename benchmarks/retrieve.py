"""Retrieval benchmark: one CT series fetched from Orthanc by C-MOVE, C-GET and WADO-RS.

Orthanc (with its DICOMweb plugin) holds a 512 x 512 CT series; a node (in this process, its
SCP listening for C-MOVE's sub-operations) runs one retrieval job of the series' study per
round, with an empty data folder each time, so the whole series is missing. The methods
alternate round by round, so that disk-cache and CPU-frequency drift hit all alike. The time
is the job's attempt, from its C-FIND (QIDO-RS) to the last instance stored, fsync'd and
indexed (C-MOVE: and marked as retrieved). Nothing is asserted: the figures go to the README.

    python -m benchmarks.retrieve [--slices 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobKind, RetrievalPayload
from dicom_node.node import Node
from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.testing import Orthanc, free_port

METHODS = ("c-move", "c-get", "dicomweb")


def loaded_orthanc(folder: Path, slices: int, node_port: int) -> tuple[Orthanc, str, int]:
    """Orthanc knowing the node (DICOMNODE) as a C-MOVE destination, holding the series; the
    study UID and the series' size in bytes."""
    files = write_ct_series(folder / "series", CtPhantomSpec(slices=slices))
    orthanc = Orthanc(
        folder / "orthanc",
        dicom_port=free_port(),
        modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]},
    ).start()
    for path in files:
        orthanc.upload(path)
    study = orthanc.get("/studies")[0]
    study_uid = orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
    return orthanc, study_uid, sum(p.stat().st_size for p in files)


def node_config(data_dir: Path, port: int, orthanc: Orthanc, method: str) -> NodeConfig:
    source: dict[str, Any] = (
        {"method": method, "url": f"{orthanc.url}/dicom-web"}
        if method == "dicomweb"
        else {
            "method": method,
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
    )
    return NodeConfig.model_validate(
        {
            "scp": {"host": "127.0.0.1", "port": port},
            "store": {"data_dir": str(data_dir), "min_free_bytes": 0},
            "http": {"enabled": False},
            "worker": {"enabled": False},
            "routing": {"rules": []},
            "retrieve": {"sources": {"pacs": source}},
        }
    )


def one_round(scratch: Path, port: int, orthanc: Orthanc, study_uid: str, method: str) -> float:
    """Seconds one retrieval attempt of the whole series took, into an empty node."""
    data_dir = scratch / f"node-{method}"
    shutil.rmtree(data_dir, ignore_errors=True)
    node = Node(node_config(data_dir, port, orthanc, method))
    # Only the SCP (C-MOVE's destination) and the store: the job is run here, not by the
    # retriever's loop, so that its poll is not in the figure.
    node.scp.start()
    try:
        with node.store.db.transaction() as conn:
            node.jobs.enqueue(
                conn, JobKind.RETRIEVE, study_uid, 1, RetrievalPayload("pacs", "benchmark", ("CT",))
            )
        job = node.jobs.claim_retrieval("benchmark", concurrency={}, retry_after=lambda _: 0.0)
        assert job is not None
        started = time.perf_counter()
        stored = node.retriever.retrieve(job)
        elapsed = time.perf_counter() - started
    finally:
        node.scp.stop(5)
        node.store.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    if stored == 0:
        raise RuntimeError(f"{method}: nothing was retrieved")
    return elapsed


def run(slices: int, rounds: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="retrieve-bench-"))
    port = free_port()
    orthanc, study_uid, size = loaded_orthanc(scratch, slices, port)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    try:
        for _ in range(rounds):
            for method in METHODS:
                times[method].append(one_round(scratch, port, orthanc, study_uid, method))
    finally:
        orthanc.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "slices": slices,
        "bytes": size,
        "rounds": rounds,
        "seconds": times,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.slices, args.rounds)
    print(
        f"retrieval of a {args.slices}-slice 512x512 CT series ({results['bytes'] / 2**20:.0f}"
        f" MiB) from Orthanc on 127.0.0.1, median of {args.rounds} alternating rounds, on"
        f" {platform.node()} ({os.cpu_count()} cores); each instance fsync'd and indexed"
    )
    print(f"{'method':<12}{'seconds':>9}{'inst/s':>9}{'MiB/s':>8}   rounds")
    for method in METHODS:
        median = results["median_s"][method]
        rounds = ", ".join(f"{t:.2f}" for t in results["seconds"][method])
        print(
            f"{method:<12}{median:>9.2f}{args.slices / median:>9.1f}"
            f"{results['bytes'] / 2**20 / median:>8.1f}   {rounds}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
