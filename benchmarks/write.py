"""SEG writing benchmark: a 300-slice 512 x 512 CT; a one-nodule SEG and a worst case.

Prints the time to build the volume and, per SEG, its frames, the time to build and save
it, its size, and the process's peak RSS growth while writing. Nothing is asserted: the
figures go to the README.

    python -m benchmarks.write [--slices 300]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from dicom_node.algorithm import (
    ANATOMICAL_STRUCTURE,
    AlgorithmResult,
    Concept,
    LabelMask,
    SeriesInput,
    Weights,
)
from dicom_node.phantoms import CtPhantomSpec, Nodule, write_ct_series
from dicom_node.write import Provenance, segmentation

NODULE = Concept("SCT", "27925004", "Nodule")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(slices: int = 300) -> dict:
    """Seconds to build the volume; per SEG case its frames, seconds, MiB and RSS growth."""
    spec = CtPhantomSpec(slices=slices, nodules=(Nodule((-60.0, 10.0, 100.0), 12.0),))
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_ct_series(Path(scratch) / "ct", spec)
        series = SeriesInput("1", tuple(paths))
        started = time.perf_counter()
        volume = series.volume()
        volume_s = time.perf_counter() - started
        masks = [
            LabelMask("Nodule", volume.array > 0, property_type=NODULE),
            LabelMask(
                "Lungs",
                volume.array < -500,
                property_type=ANATOMICAL_STRUCTURE,
                category=ANATOMICAL_STRUCTURE,
            ),
        ]
        provenance = Provenance("benchmark", "1", Weights(None, None, False))
        nodule = spec.nodule_mask()  # the phantom's own grid is the series' grid
        cases = [  # smallest first: peak RSS only grows
            (
                "1 nodule segment (empty frames left out)",
                [LabelMask("Nodule", nodule, property_type=NODULE)],
            ),
            ("2 segments on every slice (worst case)", masks),
        ]
        rows = []
        for name, case in cases:
            result = AlgorithmResult("benchmark", "1", demo=False, masks=case)
            before = peak_rss_mib()
            started = time.perf_counter()
            seg = segmentation(result, {"series": series}, provenance, series_number=1)
            out = Path(scratch) / "seg.dcm"
            seg.save_as(out)
            write_s = time.perf_counter() - started
            after = peak_rss_mib()
            rows.append(
                (
                    name,
                    int(seg.NumberOfFrames),
                    write_s,
                    out.stat().st_size / 2**20,
                    after,
                    after - before,
                )
            )
    return {
        "volume_s": volume_s,
        "cases": [
            dict(
                zip(
                    ("case", "frames", "write_s", "size_mib", "rss_mib", "grown_mib"),
                    r,
                    strict=True,
                )
            )
            for r in rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    figures = run(args.slices)
    print(f"{args.slices} slices 512x512; volume from the files: {figures['volume_s']:.2f} s")
    for case in figures["cases"]:
        name, frames, write_s, size_mib, after, grown = case.values()
        print(
            f"  {name}: {frames} frames, built and saved in {write_s:.2f} s, "
            f"{size_mib:.1f} MiB, peak RSS {after:.0f} MiB (+{grown:.0f} MiB while writing)"
        )


if __name__ == "__main__":
    main()
