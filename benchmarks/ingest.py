"""Ingest benchmark: dcmtk storescu into `dicom-node serve` versus dcmtk storescp and Orthanc.

Same machine, same sender, same files, same run; the receivers alternate round by round so
that disk-cache and CPU-frequency drift hit all alike. The node runs twice: on its fast path
(the default) and with ``scp.fast_path: false`` (pynetdicom serves every request), which is
the "before" of the fast path. Prints instances/s for each, the node's ratios to storescp and
to Orthanc, and every receiver's peak RSS. Nothing is asserted: the figures go to the README.

storescp writes each file without fsync; Orthanc fsyncs its storage area (SyncStorageArea,
on by default) and commits its SQLite index; the node fsyncs every file, its folder and its
index row before each Success.

    python -m benchmarks.ingest [--slices 300] [--rounds 3] [--parallel 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.phantoms import CtPhantomSpec, ct_series, write_ct_series
from dicom_node.testing import Orthanc, dcmtk_env, dcmtk_tool, free_port

PDU = 131072  # 128 KB, as the issue asks
ENV = dcmtk_env()


def tool(name: str) -> str:
    path = dcmtk_tool(name)
    if path is None:
        sys.exit(f"{name} not found: apt-get install dcmtk")
    return path


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("receiver exited at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("receiver did not start")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Receiver:
    name: str
    start: Callable[[Path, int], subprocess.Popen]


def start_storescp(workdir: Path, port: int) -> subprocess.Popen:
    out = workdir / "storescp"
    out.mkdir()
    return subprocess.Popen(
        [tool("storescp"), "-aet", "DICOMNODE", "--max-pdu", str(PDU), "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_orthanc(workdir: Path, port: int) -> subprocess.Popen:
    orthanc = Orthanc(
        workdir / "orthanc",
        dicom_port=port,
        aet="DICOMNODE",
        # Orthanc's default is 16 KB; the same PDU as the others keeps the comparison fair.
        extra={"MaximumPduLength": PDU, "Plugins": []},
    ).start()
    assert orthanc.proc is not None
    return orthanc.proc


def start_node(
    workdir: Path,
    port: int,
    *,
    fast_path: bool = True,
    http_port: int = 0,
    dicomweb: dict | None = None,
) -> subprocess.Popen:
    config = workdir / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scp": {
                    "host": "127.0.0.1",
                    "port": port,
                    "max_pdu_size": PDU,
                    "fast_path": fast_path,
                },
                "store": {"data_dir": str(workdir / "node-data"), "min_free_bytes": 0},
                "http": {"port": http_port},
                # Ingest alone: the phantom CT would otherwise be routed and its inference
                # would share the CPU with the later senders (tests/test_load.py does that).
                "worker": {"enabled": False},
                "logging": {"level": "WARNING"},
                "dicomweb": dicomweb or {},
            }
        )
    )
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


NODE, NODE_PYNETDICOM, STORESCP, ORTHANC = (
    "dicom-node",
    "dicom-node (pynetdicom path)",
    "dcmtk storescp",
    "Orthanc",
)
RECEIVERS = [
    Receiver(STORESCP, start_storescp),
    Receiver(ORTHANC, start_orthanc),
    Receiver(NODE, start_node),
    Receiver(NODE_PYNETDICOM, lambda workdir, port: start_node(workdir, port, fast_path=False)),
]


def send(port: int, files: list[Path]) -> None:
    result = subprocess.run(
        [
            tool("storescu"),
            "-aet",
            "BENCH",
            "-aec",
            "DICOMNODE",
            "--max-pdu",
            str(PDU),
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or "Store Failed" in result.stderr:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")


@contextmanager
def running(receiver: Receiver, scratch: Path):
    workdir = Path(tempfile.mkdtemp(dir=scratch))
    port = free_port()
    proc = receiver.start(workdir, port)
    try:
        wait_listening(port, proc)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used (its threads included, not children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class Measured:
    seconds: float
    peak_rss_mib: float
    user_s: float  # the receiver's CPU while receiving
    system_s: float


def measure(receiver: Receiver, studies: list[list[Path]], scratch: Path) -> Measured:
    """Send every study (one storescu per study, all at once) to a fresh receiver."""
    with running(receiver, scratch) as (port, proc):
        user, system = cpu_seconds(proc.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(len(studies)) as pool:
            list(pool.map(lambda files: send(port, files), studies))
        elapsed = time.perf_counter() - started
        user_after, system_after = cpu_seconds(proc.pid)
        return Measured(elapsed, peak_rss_mib(proc.pid), user_after - user, system_after - system)


def associations_per_s(receiver: Receiver, scratch: Path, count: int = 40) -> float:
    """Associations a second, each one small C-STORE between associate and release (a sender
    that opens an association per instance, as some modalities and routers do). The same
    pynetdicom requestor for every receiver."""
    slices = [ds for ds in ct_series(CtPhantomSpec(slices=count, rows=64, columns=64))]
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    with running(receiver, scratch) as (port, _):
        started = time.perf_counter()
        for ds in slices:
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            if not assoc.is_established or int(assoc.send_c_store(ds).Status) != 0:
                raise RuntimeError(f"{receiver.name} did not store over a new association")
            assoc.release()
        return count / (time.perf_counter() - started)


def run(
    slices: int = 300, rounds: int = 3, parallel: int = 4, receivers: list[str] | None = None
) -> dict[str, dict]:
    """Ingest figures for one sender and for ``parallel`` senders at once, per receiver (all,
    or those named in ``receivers``; the ratios need all)."""
    chosen = [r for r in RECEIVERS if receivers is None or r.name in receivers]
    scratch = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    try:
        studies = [
            write_ct_series(scratch / f"study{i}", CtPhantomSpec(slices=slices))
            for i in range(parallel)
        ]
        results = {}
        batches = [("1 sender", studies[:1])]
        if parallel > 1:
            batches.append((f"{parallel} senders", studies))
        for label, batch in batches:
            runs: dict[str, list[Measured]] = {r.name: [] for r in chosen}
            for _ in range(rounds):
                for receiver in chosen:  # alternate receivers every round
                    runs[receiver.name].append(measure(receiver, batch, scratch))
            instances = slices * len(batch)
            median = {name: statistics.median(m.seconds for m in ms) for name, ms in runs.items()}
            rates = {name: instances / t for name, t in median.items()}

            def per_instance_ms(ms: list[Measured], cpu: str, n: int = instances) -> float:
                return round(statistics.median(getattr(m, cpu) for m in ms) / n * 1e3, 2)

            results[label] = {
                "instances": instances,
                "median_s": {name: round(t, 3) for name, t in median.items()},
                "instances_per_s": {name: round(r, 1) for name, r in rates.items()},
                "peak_rss_mib": {
                    name: round(max(m.peak_rss_mib for m in ms), 1) for name, ms in runs.items()
                },
                # The receiver's CPU per instance, user and system: the profile in two numbers.
                "cpu_ms_per_instance": {
                    name: {
                        "user": per_instance_ms(ms, "user_s"),
                        "system": per_instance_ms(ms, "system_s"),
                    }
                    for name, ms in runs.items()
                },
            }
            if receivers is None:
                results[label] |= {
                    "ratio_node_vs_storescp": round(rates[NODE] / rates[STORESCP], 3),
                    "ratio_node_vs_orthanc": round(rates[NODE] / rates[ORTHANC], 3),
                    "ratio_pynetdicom_path_vs_storescp": round(
                        rates[NODE_PYNETDICOM] / rates[STORESCP], 3
                    ),
                }
        rates_by_name: dict[str, list[float]] = {r.name: [] for r in chosen}
        for _ in range(rounds):
            for receiver in chosen:
                rates_by_name[receiver.name].append(associations_per_s(receiver, scratch))
        results["associations"] = {
            name: round(statistics.median(r), 1) for name, r in rates_by_name.items()
        }
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every ingest benchmark takes: the series' length, the rounds, a JSON file."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    results = run(args.slices, args.rounds, args.parallel)
    print(
        f"ingest of {args.slices}-slice 512x512 CT via storescu (PDU {PDU // 1024} KB), "
        f"median of {args.rounds} alternating rounds, on {platform.node()} "
        f"({os.cpu_count()} cores); the node and Orthanc fsync every instance, storescp does not"
    )
    names = [r.name for r in RECEIVERS]
    associations = results.pop("associations")
    for label, r in results.items():
        print(f"\n{label}, {r['instances']} instances")
        print(f"{'receiver':<30}{'inst/s':>9}{'peak RSS':>12}{'CPU/instance user+sys':>26}")
        for name in names:
            cpu = r["cpu_ms_per_instance"][name]
            print(
                f"{name:<30}{r['instances_per_s'][name]:>9.1f}"
                f"{r['peak_rss_mib'][name]:>8.0f} MiB"
                f"{cpu['user']:>14.2f} + {cpu['system']:.2f} ms"
            )
        print(
            f"node / storescp {r['ratio_node_vs_storescp']:.2f}, node / Orthanc"
            f" {r['ratio_node_vs_orthanc']:.2f}, pynetdicom path / storescp"
            f" {r['ratio_pynetdicom_path_vs_storescp']:.2f}"
        )
    print("\nassociations/s, each associate + one 64x64 C-STORE + release (pynetdicom sender)")
    for name in names:
        print(f"{name:<30}{associations[name]:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results | {"associations": associations}, indent=2))


if __name__ == "__main__":
    main()
