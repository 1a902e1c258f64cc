"""The CXR pneumonia algorithm: demo accuracy on phantoms, public-weight compatibility, DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import highdicom as hd  # noqa: E402

xrv = pytest.importorskip("torchxrayvision")

from algorithms.pneumonia_cxr import PneumoniaCxr  # noqa: E402
from algorithms.pneumonia_cxr.model import (  # noqa: E402
    load_network,
    logits,
    network_input,
    public_network,
)
from dicom_node.algorithm import SeriesInput  # noqa: E402
from dicom_node.display import displayed_image  # noqa: E402
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset, cxr_pixels  # noqa: E402
from dicom_node.weights import WeightsMismatch  # noqa: E402
from tests.dicomfiles import CORPUS_SOURCE_WARNINGS, dciodvfy  # noqa: E402

UNSEEN = 500_000  # seeds far from the training (0-599) and validation (100000-100199) sets


@pytest.fixture(scope="module")
def algorithm() -> PneumoniaCxr:
    a = PneumoniaCxr()
    a.load("cpu")
    return a


def run_on(algorithm: PneumoniaCxr, spec: CxrPhantomSpec, tmp_path: Path):
    path = tmp_path / f"cxr-{spec.seed}-{spec.opacity}.dcm"
    cxr_dataset(spec).save_as(path, enforce_file_format=True)
    return algorithm.run({"series": SeriesInput("1.2.3", (path,))})


@pytest.mark.parametrize(
    ("rows", "columns", "photometric"),
    [(512, 512, "MONOCHROME2"), (420, 610, "MONOCHROME2"), (640, 400, "MONOCHROME1")],
)
def test_demo_weights_separate_opacity_from_clean(
    algorithm, tmp_path, rows, columns, photometric
) -> None:
    for offset in range(4):
        seed = UNSEEN + 10 * offset
        sick = CxrPhantomSpec(rows, columns, True, seed, photometric)
        clean = CxrPhantomSpec(rows, columns, False, seed, photometric)
        positive = run_on(algorithm, sick, tmp_path)
        negative = run_on(algorithm, clean, tmp_path)
        (p,), (n,) = positive.classifications, negative.classifications
        assert p.positive and not n.positive, (p, n)
        assert positive.demo and p.label == "Pneumonia"
        # The heat map is in the source pixel grid and peaks near the opacity.
        (heat,) = positive.heatmaps
        assert heat.array.shape == (rows, columns)
        _, (row, column) = cxr_pixels(sick)
        peak = np.unravel_index(np.argmax(heat.array), heat.array.shape)
        assert np.hypot(peak[0] - row, peak[1] - column) < 0.25 * max(rows, columns)


def test_real_radiograph_and_its_monochrome1_copy(algorithm, corpus: Path, tmp_path) -> None:
    from pydicom import dcmread

    folder = corpus / "cxr-rsna-torchxrayvision" / "tests"
    normal = folder / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    relabelled = folder / "Fake_MONOHR1.dcm"  # the same pixel values, labelled MONOCHROME1
    result = algorithm.run({"series": SeriesInput("1", (normal,))})
    assert result.heatmaps[0].array.shape == (1024, 1024)
    assert 0 <= result.classifications[0].probability <= 1
    # MONOCHROME1 means "high values dark": the displayed image is the inverse.
    a, b = displayed_image(dcmread(normal)), displayed_image(dcmread(relabelled))
    assert np.allclose(a + b, a.max() + a.min())
    assert algorithm.run({"series": SeriesInput("1", (relabelled,))}).classifications
    # Its result as DICOM: an SR and the heat-map capture, valid.
    from dicom_node.config import ResultsConfig
    from dicom_node.write import Provenance, write_all

    provenance = Provenance(algorithm.name, algorithm.version, algorithm.weights())
    inputs = {"series": SeriesInput("1", (normal,))}
    written = write_all(result, inputs, provenance, tmp_path, ResultsConfig())
    assert {w.kind for w in written} == {"SR", "SC"}
    for w in written:
        assert dciodvfy(w.path, from_source=CORPUS_SOURCE_WARNINGS) == [], w.path.name


@pytest.mark.parametrize("variant", ["rsna", "all"])
@pytest.mark.parametrize("pickled", [False, True])
def test_public_weights_load_strictly_and_match_the_reference(tmp_path, variant, pickled) -> None:
    torch.manual_seed(1)
    reference = xrv.models.DenseNet(weights=None).eval()  # xrv's own DenseNet-121
    path = tmp_path / "weights.pt"
    torch.save(reference if pickled else reference.state_dict(), path)
    loaded = load_network(path, variant=variant, allow_pickle=pickled)
    _, index, threshold = public_network(variant)
    assert (
        loaded.index
        == index
        == xrv.models.model_urls[f"densenet121-res224-{variant}"]["labels"].index("Pneumonia")
    )
    assert loaded.threshold == pytest.approx(threshold)
    x, _ = network_input(displayed_image(cxr_dataset(CxrPhantomSpec(seed=3))))
    with torch.no_grad():
        expected = reference.classifier(
            torch.nn.functional.adaptive_avg_pool2d(torch.relu(reference.features(x)), 1).flatten(1)
        )
        assert torch.equal(logits(loaded.network, x)[1], expected)


def test_weights_that_do_not_fit_are_refused_clearly(tmp_path) -> None:
    small = xrv.models.DenseNet(num_classes=1, growth_rate=8, block_config=(2, 2, 2, 2))
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(WeightsMismatch, match="does not fit torchxrayvision's DenseNet-121"):
        load_network(path, variant="rsna", allow_pickle=False)
    torch.save(small, path)
    with pytest.raises(WeightsMismatch, match="allow_pickle"):
        load_network(path, variant="rsna", allow_pickle=False)


def test_node_routes_a_radiograph_and_the_worker_classifies_it(make_node, tmp_path) -> None:
    from dicom_node.scu import send

    node = make_node(assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1})
    path = tmp_path / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=400, columns=520, opacity=True, seed=UNSEEN + 1)).save_as(
        path, enforce_file_format=True
    )
    assert send([path], "127.0.0.1", node.port).sent == [path]
    ((result, folder),) = node.results(1)
    assert result["demo"] and result["classifications"][0]["positive"]
    heat = np.load(folder / result["heatmaps"][0]["file"])
    assert heat.shape == (400, 520)
    outputs = node.outputs()
    assert set(outputs) == {"SR", "SC"}
    for output in outputs.values():
        assert dciodvfy(output) == [], output.name
    assert "Present" in str(hd.sr.srread(outputs["SR"]))


def test_offline_run_writes_results(tmp_path) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "in" / "cxr.dcm"
    path.parent.mkdir()
    cxr_dataset(CxrPhantomSpec(seed=UNSEEN + 3)).save_as(path, enforce_file_format=True)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "run",
            str(path.parent),
            "--algorithm",
            "pneumonia-cxr",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "case-001" / "result.json").read_text())
    assert result["classifications"][0]["label"] == "Pneumonia"
    assert not result["classifications"][0]["positive"]
