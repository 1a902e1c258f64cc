"""Inference overhead benchmark: the node's job versus the bare network, per algorithm.

For each built-in algorithm (demo weights unless configured otherwise) a phantom case is put
into a node store the way the SCP stores it, and the node's inference worker runs the job:
claim, read the DICOM files, build the volume, pre-process, run, post-process back to the
source grid, save the result and commit it. That "job started" to "result ready" time is set
against a bare script in the same run: the same loaded network on the same pre-processed
tensor (for the CXR the forward pass and its Grad-CAM, which the result needs). Both are
measured warm (the worker keeps models loaded), alternating, best of ``--repeats``.

Besides the benchmark's own phantom, the CT detector runs on real chest CT geometries, whose
resampling to the bundle's 0.703 x 0.703 x 1.25 mm is most of their cost: 64 slices of 5 mm
(0.78 mm pixels) and 420 slices of 1 mm (0.68 mm pixels). Each case runs in a fresh process,
so its peak RSS is that of a worker which has loaded the model and run that one job.

    python -m benchmarks.inference [--repeats 3] [--case NAME ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicom_node.algorithm import Algorithm, SeriesInput
from dicom_node.config import NodeConfig
from dicom_node.infer import Worker, series_input
from dicom_node.jobs import InferencePayload, JobKind
from dicom_node.phantoms import (
    BrainPhantomSpec,
    CtPhantomSpec,
    CxrPhantomSpec,
    Nodule,
    brain_study,
    ct_series,
    cxr_dataset,
)
from dicom_node.store import InstanceStore, Sender

SENDER = Sender("BENCHMARK", "127.0.0.1")


PHANTOM_NODULE = Nodule((-60.0, 10.0, 100.0), 9.0)


def lung_case(
    slices: int = 160,
    slice_thickness_mm: float = 1.25,
    pixel_spacing_mm: float = 0.7,
    nodule: Nodule = PHANTOM_NODULE,
) -> dict[str, list[Dataset]]:
    """A 512 x 512 chest CT phantom with one nodule; by default 160 slices of 1.25 mm at
    0.7 mm, about the bundle's own grid."""
    spec = CtPhantomSpec(
        slices=slices,
        slice_thickness_mm=slice_thickness_mm,
        pixel_spacing_mm=(pixel_spacing_mm, pixel_spacing_mm),
        noise_hu=20,
        nodules=(nodule,),
    )
    return {"series": list(ct_series(spec))}


# Real chest CT geometries: a routine 64 x 5 mm at 0.78 mm, and a thin-slice 420 x 1 mm at
# 0.68 mm, which the bundle's 0.703 x 0.703 x 1.25 mm grid resamples.
lung_5mm_case = partial(lung_case, 64, 5.0, 0.78, Nodule((-60.0, 10.0, 160.0), 10.0))
lung_1mm_case = partial(lung_case, 420, 1.0, 0.68, Nodule((-60.0, 10.0, 200.0), 8.0))


def brain_case() -> dict[str, list[Dataset]]:
    """Four 240 x 240 x 155 sequences at 1 mm: the size of a BraTS case."""
    spec = BrainPhantomSpec(frames=155, rows=240, columns=240, spacing_mm=(1.0, 1.0, 1.0))
    return brain_study(spec).series


def cxr_case() -> dict[str, list[Dataset]]:
    """A 2048 x 2048 radiograph with an opacity."""
    return {"series": [cxr_dataset(CxrPhantomSpec(rows=2048, columns=2048, opacity=True))]}


def lung_bare(algorithm: Algorithm, inputs: Mapping[str, SeriesInput]) -> Callable[[], object]:
    from dicom_node_algorithms.lung_nodules_ct.model import detect, preprocess

    loaded = algorithm.loaded  # type: ignore[attr-defined]
    image = preprocess(inputs["series"].volume(), loaded.parameters)
    return lambda: detect(loaded, image)


def brain_bare(algorithm: Algorithm, inputs: Mapping[str, SeriesInput]) -> Callable[[], object]:
    from dicom_node_algorithms.brain_tumour_mr.model import network_input, segment

    loaded = algorithm.loaded  # type: ignore[attr-defined]
    image, _ = network_input({role: series.volume() for role, series in inputs.items()})
    return lambda: segment(loaded, image)


def cxr_bare(algorithm: Algorithm, inputs: Mapping[str, SeriesInput]) -> Callable[[], object]:
    from dicom_node.display import displayed_image
    from dicom_node_algorithms.pneumonia_cxr.model import network_input, probability_and_cam

    loaded = algorithm.loaded  # type: ignore[attr-defined]
    (dataset,) = inputs["series"].datasets()
    x, _ = network_input(displayed_image(dataset))
    x = x.to(algorithm.device)  # type: ignore[attr-defined]
    return lambda: probability_and_cam(loaded, x)


@dataclass(frozen=True)
class Case:
    algorithm: str
    make: Callable[[], dict[str, list[Dataset]]]
    bare: Callable[[Algorithm, Mapping[str, SeriesInput]], Callable[[], object]]
    target: str


CASES = {
    "lung-nodules-ct": Case("lung-nodules-ct", lung_case, lung_bare, "<= 5 %"),
    "lung-nodules-ct 5 mm": Case("lung-nodules-ct", lung_5mm_case, lung_bare, "<= 5 %"),
    "lung-nodules-ct 1 mm": Case("lung-nodules-ct", lung_1mm_case, lung_bare, "<= 5 %"),
    "brain-tumour-mr": Case("brain-tumour-mr", brain_case, brain_bare, "<= 5 %"),
    "pneumonia-cxr": Case("pneumonia-cxr", cxr_case, cxr_bare, "<= 1 s"),
}


def encoded(ds: Dataset) -> bytes:
    """The data set as the SCP receives it: Explicit VR Little Endian, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    name: str, case: Case, repeats: int, scratch: Path, device: str
) -> dict[str, float | str]:
    config = NodeConfig.model_validate(
        {"store": {"data_dir": str(scratch / name)}, "worker": {"device": device}}
    )
    store = InstanceStore.open(config.store.data_dir)
    inputs = {}
    for role, datasets in case.make().items():
        for ds in datasets:
            store.put(encoded(ds), ds.file_meta.TransferSyntaxUID, SENDER)
        inputs[role] = datasets[0].SeriesInstanceUID
    worker = Worker(config, name="benchmark")
    algorithm = worker.runner.algorithm(case.algorithm)  # loaded once, kept warm, as in the node

    def node_job() -> None:
        with store.db.transaction() as conn:
            job = InferencePayload(case.algorithm, inputs, "series")
            worker.jobs.enqueue(conn, JobKind.INFERENCE, "benchmark", 1, job)
        job = worker.work_once()
        assert job is not None and worker.jobs.get(job.id).state.value == "succeeded", job

    node_job()  # warm-up: first-call allocations and kernel selection
    peak = peak_rss_mib()  # before the bare run builds its own volume and tensor
    bare = case.bare(
        algorithm, {role: series_input(store.db, store.data_dir, u) for role, u in inputs.items()}
    )
    bare()
    node_s, bare_s = [], []
    for _ in range(repeats):
        node_s.append(timed(node_job))
        bare_s.append(timed(bare))
    store.close()
    return {
        "node_s": min(node_s),
        "bare_s": min(bare_s),
        "device": worker.device,
        "peak_rss_mib": peak,
    }


def _measure_in_child(name: str, repeats: int, scratch: str, device: str) -> dict:
    return measure(name, CASES[name], repeats, Path(scratch), device)


def run(
    cases: list[str] | None = None, repeats: int = 3, device: str = "auto"
) -> dict[str, dict[str, float | str]]:
    """Per case: the node's job and the bare network, best of ``repeats``, in seconds, and
    the peak RSS of the process that ran it (MiB)."""
    figures: dict[str, dict[str, float | str]] = {}
    spawn = multiprocessing.get_context("spawn")  # a fresh process: its own peak RSS
    with tempfile.TemporaryDirectory() as scratch:
        for name in cases or list(CASES):
            with spawn.Pool(1) as pool:
                measured = pool.apply(_measure_in_child, (name, repeats, scratch, device))
            figures[name] = {**measured, "target": CASES[name].target}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; best of {args.repeats}"
    )
    print(
        f"{'case':<22} {'node job s':>10} {'bare net s':>10} {'overhead s':>10} "
        f"{'overhead':>9} {'peak RSS':>9}  target"
    )
    for name in args.case or list(CASES):
        f = run([name], args.repeats, args.device)[name]
        overhead = f["node_s"] - f["bare_s"]
        print(
            f"{name:<22} {f['node_s']:>10.2f} {f['bare_s']:>10.2f} "
            f"{overhead:>10.2f} {100 * overhead / f['bare_s']:>8.1f}% "
            f"{f['peak_rss_mib']:>6.0f} MiB  {f['target']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
