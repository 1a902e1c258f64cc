"""Every performance figure in one table: ingest against dcmtk storescp (and over STOW-RS
against C-STORE and Orthanc), completion latency,
inference against the bare network, end-to-end latency to Orthanc against storescu, peak RSS
while ingesting 1000 slices, SEG writing, a stat job's wait behind routine ones against first
in, first out, and cluster mode against the embedded node (benchmarks/cluster.py; skipped,
saying why, where PostgreSQL, RabbitMQ, SeaweedFS or the cluster extra are missing). Each
peer is measured in the same run, on the same machine; the table names the machine.

    python -m benchmarks.run_all [--quick] [--device auto|cpu|cuda] [--out FILE]

Writes the table as Markdown to ``benchmarks/results/latest.md`` (and the raw figures beside
it as JSON); the README shows the latest one. ``--quick`` uses smaller cases to check that the
harness works; its figures are not for the README.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks import cluster, deliver, inference, ingest, queue, stow, write
from benchmarks.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {os.cpu_count()} x {model}, {memory_gib:.0f} GiB, {gpu};"
        f" Python {platform.python_version()}, torch {torch.__version__}"
    )


def timed(label: str, measure: Callable[[], Any]) -> Any:
    print(f"-- {label} ...", flush=True)
    started = time.perf_counter()
    figures = measure()
    print(f"   done in {time.perf_counter() - started:.0f} s", flush=True)
    return figures


def in_fresh_process(measure: Callable[..., Any], *args: Any) -> Any:
    """Run a measurement in a new process: peak RSS is per process, and this one has already
    held the other benchmarks' volumes and networks."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


Row = tuple[str, str, str, str, str, str]  # area, measure, node, peer, ratio, target
COLUMNS = ("area", "measure", "dicom-node", "peer, same run", "ratio", "target")


def _ingest_rows(figures: dict, rss: dict, slices: int, rss_slices: int) -> list[Row]:
    rows: list[Row] = []
    batches = {label: r for label, r in figures.items() if label != "associations"}
    for label, r in batches.items():
        ips = r["instances_per_s"]
        measure = f"{label}, {slices}-slice CT 512², instances/s"
        rows += [
            (
                "ingest",
                measure,
                f"{ips[ingest.NODE]:.0f}",
                f"{ips[ingest.STORESCP]:.0f} (dcmtk storescp)",
                f"{r['ratio_node_vs_storescp']:.2f}",
                ">= 0.7" if label == "1 sender" else ">= 1.0",
            ),
            (
                "ingest",
                measure,
                f"{ips[ingest.NODE]:.0f}",
                f"{ips[ingest.ORTHANC]:.0f} (Orthanc)",
                f"{r['ratio_node_vs_orthanc']:.2f}",
                "" if label == "1 sender" else ">= 1.5",
            ),
            (
                "ingest",
                f"{measure}, pynetdicom path (scp.fast_path: false)",
                f"{ips[ingest.NODE_PYNETDICOM]:.0f}",
                f"{ips[ingest.STORESCP]:.0f} (dcmtk storescp)",
                f"{r['ratio_pynetdicom_path_vs_storescp']:.2f}",
                "",
            ),
        ]
    per_s = figures["associations"]
    for peer in (ingest.STORESCP, ingest.ORTHANC):
        rows.append(
            (
                "ingest",
                "associations/s, each associate + one C-STORE + release",
                f"{per_s[ingest.NODE]:.0f}",
                f"{per_s[peer]:.0f} ({peer})",
                f"{per_s[ingest.NODE] / per_s[peer]:.2f}",
                "",
            )
        )
    rows.append(
        (
            "memory",
            f"peak RSS of serve while ingesting {rss_slices} slices",
            f"{rss['peak_rss_mib'][ingest.NODE]:.0f} MiB",
            "",
            "",
            "< 300 MB",
        )
    )
    return rows


def _stow_rows(r: dict, slices: int) -> list[Row]:
    ips = r["instances_per_s"]
    measure = f"{slices}-slice CT 512² over STOW-RS, instances/s"
    return [
        (
            "ingest",
            f"{measure}, one request",
            f"{ips[stow.NODE_STOW]:.0f}",
            f"{ips[stow.NODE_CSTORE]:.0f} (the node by C-STORE)",
            f"{r['ratio_stow_vs_cstore']:.2f}",
            "",
        ),
        (
            "ingest",
            f"{measure}, one request",
            f"{ips[stow.NODE_STOW]:.0f}",
            f"{ips[stow.ORTHANC_STOW]:.0f} (Orthanc STOW-RS)",
            f"{r['ratio_stow_vs_orthanc_stow']:.2f}",
            "",
        ),
        (
            "ingest",
            f"{measure}, a request per instance (completion on request end / by quiet time)",
            f"{ips[stow.NODE_STOW_EACH]:.0f} / {ips[stow.NODE_STOW_EACH_QUIET]:.0f}",
            f"{ips[stow.ORTHANC_STOW_EACH]:.0f} (Orthanc STOW-RS)",
            f"{r['ratio_stow_each_vs_orthanc_stow_each']:.2f}"
            f" / {r['ratio_stow_each_quiet_vs_orthanc_stow_each']:.2f}",
            "",
        ),
    ]


def _inference_rows(figures: dict) -> list[Row]:
    rows: list[Row] = []
    for name, f in figures.items():
        overhead = f["node_s"] - f["bare_s"]
        rows.append(
            (
                "inference",
                f"{name} job on {f['device']} (s); overhead {overhead:.2f} s",
                f"{f['node_s']:.2f}",
                f"{f['bare_s']:.2f} (bare network)",
                f"{f['node_s'] / f['bare_s']:.2f}",
                f"overhead {f['target']}",
            )
        )
    return rows


def _deliver_rows(figures: dict) -> list[Row]:
    rows: list[Row] = []
    for name, f in figures.items():
        rows.append(
            (
                "completion",
                f"{name}: last instance acknowledged → complete (s), at association release",
                # The release comes with the last acknowledgement: clock noise can go below 0.
                f"{max(0.0, f['complete_s']):.2f}",
                "",
                "",
                "",
            )
        )
        rows.append(
            (
                "end to end",
                f"{name}: acknowledged → results stored in Orthanc (s); model {f['model_s']:.2f},"
                f" writing {f['writing_s']:.2f}, node overhead {f['overhead_s']:.2f}",
                f"{f['total_s']:.2f}",
                f"{f['storescu_s']:.2f} (storescu of the results)",
                "",
                "overhead ≤ 1 s",
            )
        )
    return rows


def _queue_rows(figures: dict, device: str) -> list[Row]:
    return [
        (
            "queue",
            f"stat CXR behind routine CTs, {label}, {device}: its completion → its job starts (s)",
            f"{f['priority']:.2f}",
            f"{f['fifo']:.2f} (same node, first in first out)",
            f"{f['priority'] / f['fifo']:.2f}",
            "waits only for a running job",
        )
        for label, f in figures.items()
    ]


def _write_rows(figures: dict, slices: int) -> list[Row]:
    rows: list[Row] = [
        ("writing", f"volume from {slices} CT files (s)", f"{figures['volume_s']:.2f}", "", "", "")
    ]
    for case in figures["cases"]:
        rows.append(
            (
                "writing",
                f"SEG, {case['case']}: {case['frames']} frames, {case['size_mib']:.1f} MiB,"
                f" +{case['grown_mib']:.0f} MiB RSS (s)",
                f"{case['write_s']:.2f}",
                "",
                "",
                "",
            )
        )
    return rows


def _cluster_rows(figures: dict | None) -> list[Row]:
    """Cluster mode's rows (benchmarks/cluster.py), the embedded node as the peer."""
    if figures is None:
        return []
    return [
        (area, f"cluster mode: {measure}", ours, f"{peer} (embedded)" if peer else "", ratio, "")
        for area, measure, ours, peer, ratio in cluster.rows(json.loads(json.dumps(figures)))
    ]


def _cluster(quick: bool, device: str) -> dict | None:
    missing = cluster.missing_servers()
    if missing:
        print(
            f"   skipped: cluster mode needs {', '.join(missing)} (make system-deps, pip install"
            " -e '.[cluster]')",
            flush=True,
        )
        return None
    return cluster.run(cluster.QUICK if quick else cluster.FULL, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases: a harness check")
    parser.add_argument("--device", default="auto", help="inference device (auto, cpu, cuda)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md")
    args = parser.parse_args()
    slices, rss_slices, rounds, repeats = (60, 200, 1, 1) if args.quick else (300, 1000, 3, 2)
    started = time.time()
    figures = {
        "ingest": timed("ingest", lambda: ingest.run(slices, rounds, 4)),
        "ingest_rss": timed(
            f"ingest of {rss_slices} slices",
            lambda: ingest.run(rss_slices, 1, 1, [ingest.NODE])["1 sender"],
        ),
        "stow": timed("STOW-RS ingest", lambda: stow.run(slices, rounds)),
        "inference": timed("inference", lambda: inference.run(None, repeats, args.device)),
        "deliver": timed("end to end", lambda: deliver.run(1.0, repeats)),
        "write": timed("SEG writing", lambda: in_fresh_process(write.run, slices)),
        "queue": timed("queue", lambda: queue.run((1, 2), 2 if args.quick else 3, args.device)),
        "cluster": timed("cluster mode", lambda: _cluster(args.quick, args.device)),
    }
    rows = [
        *_ingest_rows(figures["ingest"], figures["ingest_rss"], slices, rss_slices),
        *_stow_rows(figures["stow"], slices),
        *_deliver_rows(figures["deliver"]),
        *_inference_rows(figures["inference"]),
        *_write_rows(figures["write"], slices),
        *_queue_rows(figures["queue"], args.device),
        *_cluster_rows(figures["cluster"]),
    ]
    header = (
        f"Benchmarks of {time.strftime('%Y-%m-%d', time.gmtime(started))} on {machine()}."
        f" Demo weights; {'quick harness check' if args.quick else 'full run'};"
        f" `python -m benchmarks.run_all` ({time.time() - started:.0f} s)."
    )
    text = markdown_table(header, COLUMNS, rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
