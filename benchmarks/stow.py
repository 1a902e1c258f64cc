"""STOW-RS ingest: a 300-slice CT posted to `dicom-node serve` over STOW-RS, against the same
series sent to the same node by C-STORE (dcmtk storescu) and posted to Orthanc's DICOMweb
plugin, in the same run.

The receivers alternate round by round; each gets the same files. STOW-RS is posted two ways:
the whole series in one request (as Orthanc's and dicomweb-client's STOW clients send a study),
and one instance per request (a router that posts each instance as it gets it) — to the node
twice, on its defaults (each request completes the series, as an association's release does)
and with ``dicomweb.complete_on_request_end: false`` (the quiet time completes it). The request
bodies are built before the clock starts, so the sender's cost is the socket only. Prints
instances/s, the ratios, and peak RSS. Nothing is asserted: the figures go to the README.

Both the node and Orthanc fsync every instance before they answer.

    python -m benchmarks.stow [--slices 300] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.ingest import arguments, peak_rss_mib, send, start_node, wait_listening
from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.testing import Orthanc, free_port

BOUNDARY = "dicom-node-benchmark-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(files: list[Path]) -> bytes:
    """One multipart/related body holding ``files`` (PS3.18 8.6.1.2)."""
    parts = [
        b"--"
        + BOUNDARY.encode()
        + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + p.read_bytes()
        + b"\r\n"
        for p in files
    ]
    return b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        if response.status != 200:
            raise RuntimeError(f"STOW-RS to {url} answered {response.status}")
        response.read()


@dataclass
class Way:
    """A receiver and how the series is sent to it."""

    name: str
    send: Callable[[Path, list[Path], list[bytes]], None]  # workdir, files, bodies


NODE_CSTORE = "dicom-node, C-STORE (storescu)"
NODE_STOW = "dicom-node, STOW-RS, one request"
NODE_STOW_EACH = "dicom-node, STOW-RS, a request per instance"
NODE_STOW_EACH_QUIET = "  the same, complete_on_request_end: false"
ORTHANC_STOW = "Orthanc, STOW-RS, one request"
ORTHANC_STOW_EACH = "Orthanc, STOW-RS, a request per instance"


def _node(
    workdir: Path, deliver: Callable[[int, int], None], dicomweb: dict | None = None
) -> float:
    port, http_port = free_port(), free_port()
    proc = start_node(workdir, port, http_port=http_port, dicomweb=dicomweb)
    try:
        wait_listening(port, proc)
        wait_listening(http_port, proc)
        started = time.perf_counter()
        deliver(port, http_port)
        elapsed = time.perf_counter() - started
        _PEAK[workdir] = peak_rss_mib(proc.pid)
        return elapsed
    finally:
        proc.terminate()
        proc.wait(30)


def _orthanc(workdir: Path, deliver: Callable[[str], None]) -> float:
    orthanc = Orthanc(workdir / "orthanc").start()
    try:
        started = time.perf_counter()
        deliver(f"{orthanc.url}/dicom-web/studies")
        elapsed = time.perf_counter() - started
        assert orthanc.proc is not None
        _PEAK[workdir] = peak_rss_mib(orthanc.proc.pid)
        return elapsed
    finally:
        orthanc.stop()


_PEAK: dict[Path, float] = {}


def _each(url: str, bodies: list[bytes]) -> None:
    for body in bodies:
        post(url, body)


WAYS = {
    NODE_CSTORE: lambda w, files, one, each: _node(w, lambda port, _: send(port, files)),
    NODE_STOW: lambda w, files, one, each: _node(
        w, lambda _, http: post(f"http://127.0.0.1:{http}/dicom-web/studies", one)
    ),
    NODE_STOW_EACH: lambda w, files, one, each: _node(
        w, lambda _, http: _each(f"http://127.0.0.1:{http}/dicom-web/studies", each)
    ),
    NODE_STOW_EACH_QUIET: lambda w, files, one, each: _node(
        w,
        lambda _, http: _each(f"http://127.0.0.1:{http}/dicom-web/studies", each),
        {"complete_on_request_end": False},
    ),
    ORTHANC_STOW: lambda w, files, one, each: _orthanc(w, lambda url: post(url, one)),
    ORTHANC_STOW_EACH: lambda w, files, one, each: _orthanc(w, lambda url: _each(url, each)),
}


def run(slices: int = 300, rounds: int = 3) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="dicom-node-stow-bench-"))
    try:
        files = write_ct_series(scratch / "ct", CtPhantomSpec(slices=slices))
        one = multipart(files)
        each = [multipart([p]) for p in files]
        seconds: dict[str, list[float]] = {name: [] for name in WAYS}
        peak: dict[str, float] = {name: 0.0 for name in WAYS}
        for _ in range(rounds):
            for name, way in WAYS.items():  # alternate every round
                workdir = Path(tempfile.mkdtemp(dir=scratch))
                seconds[name].append(way(workdir, files, one, each))
                peak[name] = max(peak[name], _PEAK.pop(workdir))
                shutil.rmtree(workdir, ignore_errors=True)
        rates = {n: slices / statistics.median(s) for n, s in seconds.items()}
        return {
            "instances": slices,
            "megabytes": round(len(one) / 1e6, 1),
            "instances_per_s": {n: round(r, 1) for n, r in rates.items()},
            "peak_rss_mib": {n: round(v, 1) for n, v in peak.items()},
            "ratio_stow_vs_cstore": round(rates[NODE_STOW] / rates[NODE_CSTORE], 3),
            "ratio_stow_vs_orthanc_stow": round(rates[NODE_STOW] / rates[ORTHANC_STOW], 3),
            "ratio_stow_each_vs_orthanc_stow_each": round(
                rates[NODE_STOW_EACH] / rates[ORTHANC_STOW_EACH], 3
            ),
            "ratio_stow_each_quiet_vs_orthanc_stow_each": round(
                rates[NODE_STOW_EACH_QUIET] / rates[ORTHANC_STOW_EACH], 3
            ),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    args = arguments(__doc__).parse_args()
    r = run(args.slices, args.rounds)
    print(
        f"STOW-RS ingest of a {args.slices}-slice 512x512 CT ({r['megabytes']} MB), median of"
        f" {args.rounds} alternating rounds, on {platform.node()} ({os.cpu_count()} cores);"
        " every receiver fsyncs each instance before it answers"
    )
    print(f"{'receiver, how':<46}{'inst/s':>9}{'peak RSS':>12}")
    for name, rate in r["instances_per_s"].items():
        print(f"{name:<46}{rate:>9.1f}{r['peak_rss_mib'][name]:>8.0f} MiB")
    print(
        f"node STOW-RS / node C-STORE {r['ratio_stow_vs_cstore']:.2f}, node STOW-RS / Orthanc"
        f" STOW-RS {r['ratio_stow_vs_orthanc_stow']:.2f} (one request),"
        f" {r['ratio_stow_each_vs_orthanc_stow_each']:.2f} (a request per instance),"
        f" {r['ratio_stow_each_quiet_vs_orthanc_stow_each']:.2f} (the same, completion by"
        " quiet time)"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
