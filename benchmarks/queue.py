"""How long an emergency radiograph waits behind routine CTs: from the radiograph's series
counting as complete to its inference job starting, while routine chest CT jobs run and wait.

The node runs the built-in rules with the radiograph's rule at ``priority: stat``; its peer,
measured in the same run on the same machine, is the same node with every rule at the default
``routine``, i.e. first in, first out, as the queue was before priorities. Each is measured with
1 and with 2 worker processes (``worker.processes``), demo weights, on the CPU (or the device
named). The routine CTs are sent first, each its own study; the radiograph is sent once every
worker is busy with one, so that routine jobs are both running and queued ahead of it.

    python -m benchmarks.queue [--workers 1 2] [--ct 3] [--device auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from dicom_node.config import DEFAULT_ROUTES
from dicom_node.phantoms import CtPhantomSpec, CxrPhantomSpec, Nodule, cxr_dataset, write_ct_series
from dicom_node.scu import send
from dicom_node.testing import ServeProcess

# The stat rule: the built-in radiograph rule, first in the queue.
STAT = "pneumonia-cxr"


def rules(priority: bool) -> list[dict[str, Any]]:
    """The built-in rules, the radiograph's at stat when ``priority``."""
    out = []
    for rule in DEFAULT_ROUTES:
        if rule["algorithm"] == "brain-tumour-mr":
            continue  # no MR is sent: its rule would only cost a decision
        out.append({**rule, "priority": "stat"} if priority and rule["algorithm"] == STAT else rule)
    return out


def studies(folder: Path, cts: int) -> tuple[list[list[Path]], Path]:
    """``cts`` chest CT studies (new UIDs each) and one chest radiograph."""
    series = [
        write_ct_series(
            folder / f"ct{i}",
            CtPhantomSpec(slices=80, seed=i, nodules=(Nodule((-60.0, 10.0, 40.0), 9.0),)),
        )
        for i in range(cts)
    ]
    cxr = folder / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=1024, columns=1024, opacity=True)).save_as(
        cxr, enforce_file_format=True
    )
    return series, cxr


def _wait(node: ServeProcess, sql: str, until: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while node.query(sql)[0][0] < until:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sql!r} did not reach {until}:\n{node.log()[-3000:]}")
        time.sleep(0.05)


def stat_wait_s(folder: Path, workers: int, cts: int, priority: bool, device: str) -> float:
    """Seconds from the radiograph's completion to its inference job's start."""
    series, cxr = studies(folder / "studies", cts)
    (folder / "node").mkdir()
    node = ServeProcess(
        folder / "node",
        {
            "assembly": {"series_quiet_seconds": 1.0, "study_quiet_seconds": 1.0},
            "routing": {"rules": rules(priority)},
            "worker": {"processes": workers, "device": device},
        },
    )
    node.start(timeout_s=120)
    try:
        for files in series:
            assert not send(files, "127.0.0.1", node.port).failed
        running = "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND state = 'running'"
        _wait(node, running, workers)  # every worker busy, the other CTs queued
        assert not send([cxr], "127.0.0.1", node.port).failed
        started = (
            "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND started_at IS NOT NULL"
            f" AND payload LIKE '%\"{STAT}\"%'"
        )
        _wait(node, started, 1)
        (row,) = node.query(
            "SELECT i.started_at - c.created_at FROM jobs i JOIN jobs c"
            " ON c.subject_uid = i.subject_uid AND c.generation = i.generation"
            " AND c.kind != 'inference'"
            f" WHERE i.kind = 'inference' AND i.payload LIKE '%\"{STAT}\"%'"
        )
        return float(row[0])
    finally:
        node.kill()  # the routine CTs left in the queue are not part of the measure


def run(workers: tuple[int, ...] = (1, 2), cts: int = 3, device: str = "auto") -> dict[str, Any]:
    """Per worker count: the stat radiograph's wait with priorities and first in, first out."""
    figures: dict[str, Any] = {}
    for count in workers:
        row = {}
        for mode, priority in (("priority", True), ("fifo", False)):
            with tempfile.TemporaryDirectory() as scratch:
                row[mode] = stat_wait_s(Path(scratch), count, cts + count - 1, priority, device)
            print(f"{count} worker(s), {mode}: {row[mode]:.2f} s", flush=True)
        figures[f"{count} worker{'s' if count > 1 else ''}"] = row
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ct", type=int, default=3, help="routine CT studies (one worker)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    figures = run(tuple(args.workers), args.ct, args.device)
    print(f"{'workers':<10} {'stat, priority (s)':>19} {'stat, FIFO (s)':>15} {'ratio':>6}")
    for label, row in figures.items():
        ratio = row["priority"] / row["fifo"]
        print(f"{label:<10} {row['priority']:19.2f} {row['fifo']:15.2f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
