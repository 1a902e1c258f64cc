"""SEG writing benchmark: a 300-slice 512 x 512 CT, two segments, written and read back.

Prints the time to build the volume, to build and save the SEG, its size, and the process's
peak RSS growth while writing. Nothing is asserted: the figures go to the README.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    spec = CtPhantomSpec(slices=args.slices, nodules=(Nodule((-60.0, 10.0, 100.0), 12.0),))
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
        result = AlgorithmResult("benchmark", "1", demo=False, masks=masks)
        provenance = Provenance("benchmark", "1", Weights(None, None, False))
        before = peak_rss_mib()
        started = time.perf_counter()
        seg = segmentation(result, {"series": series}, provenance, series_number=1)
        out = Path(scratch) / "seg.dcm"
        seg.save_as(out)
        write_s = time.perf_counter() - started
        after = peak_rss_mib()
        frames = int(seg.NumberOfFrames)
        size_mib = out.stat().st_size / 2**20
    print(f"{args.slices} slices 512x512, 2 segments ({frames} frames)")
    print(f"  volume from {args.slices} files: {volume_s:.2f} s")
    print(f"  SEG built and saved:  {write_s:.2f} s, {size_mib:.1f} MiB")
    print(f"  peak RSS {after:.0f} MiB (+{after - before:.0f} MiB while writing)")


if __name__ == "__main__":
    main()
