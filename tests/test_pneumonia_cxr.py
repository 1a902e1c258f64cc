"""The CXR pneumonia algorithm: demo accuracy on phantoms, public-weight compatibility, DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import highdicom as hd  # noqa: E402

xrv = pytest.importorskip("torchxrayvision")

from dicom_node.algorithm import SeriesInput  # noqa: E402
from dicom_node.display import displayed_image  # noqa: E402
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset, cxr_pixels  # noqa: E402
from dicom_node.weights import WeightsMismatch  # noqa: E402
from dicom_node_algorithms.pneumonia_cxr import PneumoniaCxr  # noqa: E402
from dicom_node_algorithms.pneumonia_cxr.model import (  # noqa: E402
    load_network,
    logits,
    network_input,
    public_network,
)
from tests.support.dicomfiles import CORPUS_SOURCE_WARNINGS, dciodvfy  # noqa: E402

UNSEEN = 500_000  # seeds far from the training (0-1199) and validation (100000-100159) sets
# The held-out generator: never seen in training, drawn differently (attenuation along rays).
HELD_OUT = 800_000
# How the same picture may be stored: (photometric, bits stored, VOI), sizes vary with them.
ENCODINGS = [
    ("MONOCHROME2", 12, "window", 512, 512),
    ("MONOCHROME1", 8, "window", 448, 560),
    ("MONOCHROME1", 12, "tight-window", 600, 480),
    ("MONOCHROME2", 16, "lut", 700, 640),
    ("MONOCHROME2", 10, "none", 384, 384),
    ("MONOCHROME1", 16, "lut", 880, 1024),
]


@pytest.fixture(scope="module")
def algorithm() -> PneumoniaCxr:
    a = PneumoniaCxr()
    a.load("cpu")
    return a


def run_on(algorithm: PneumoniaCxr, spec: CxrPhantomSpec, tmp_path: Path):
    path = tmp_path / f"cxr-{spec.seed}-{spec.opacity}.dcm"
    cxr_dataset(spec).save_as(path, enforce_file_format=True)
    return algorithm.run({"series": SeriesInput("1.2.3", (path,))})


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "columns", "photometric"),
    [(512, 512, "MONOCHROME2"), (420, 610, "MONOCHROME2"), (640, 400, "MONOCHROME1")],
)
def test_demo_weights_separate_opacity_from_clean(
    algorithm, tmp_path, rows, columns, photometric
) -> None:
    """Unseen seeds of the training generator, each drawn with and without an opacity: the
    opacity raises the score, and most cases land on the right side of the threshold (the
    operating point keeps 90 % of clear validation phantoms negative; 82 % of opacities are
    positive there)."""
    right = near = 0
    for offset in range(4):
        seed = UNSEEN + 10 * offset
        sick = CxrPhantomSpec(rows, columns, True, seed, photometric)
        clean = CxrPhantomSpec(rows, columns, False, seed, photometric)
        positive = run_on(algorithm, sick, tmp_path)
        negative = run_on(algorithm, clean, tmp_path)
        (p,), (n,) = positive.classifications, negative.classifications
        assert p.probability > n.probability, (p, n)
        right += p.positive + (not n.positive)
        assert algorithm.weights().demo and p.label == "Pneumonia"
        # The heat map is in the source pixel grid.
        (heat,) = positive.heatmaps
        assert heat.array.shape == (rows, columns)
        _, (row, column) = cxr_pixels(sick)
        peak = np.unravel_index(np.argmax(heat.array), heat.array.shape)
        near += bool(np.hypot(peak[0] - row, peak[1] - column) < 0.25 * max(rows, columns))
    assert right >= 6, right
    # Grad-CAM of a 7 x 7 feature grid is coarse: near the opacity in most cases, not all.
    assert near >= 3, near


@pytest.mark.unit
@pytest.mark.slow
def test_held_out_generator_clear_mostly_negative_and_consolidation_mostly_positive(
    algorithm, tmp_path
) -> None:
    """Phantoms of a generator the demo never saw (attenuation along rays, not painted
    ellipses), stored every way a modality stores a radiograph (8-16 bits, MONOCHROME1, window,
    VOI LUT, none). Before retraining every one scored 1.00 (AUC 0.43 on 120 such cases).

    The bounds are what this demo does off its training distribution (AUC 0.77, 75 % of clear
    cases negative, 65 % of consolidations positive on seeds 700000-700119), with a margin:
    it is a demo, and these are the numbers the README states. A demo that is always
    positive, or always negative, fails."""
    clear, consolidation = [], []
    for k in range(4):
        for photometric, bits, voi, rows, columns in ENCODINGS:
            for opacity in (False, True):
                spec = CxrPhantomSpec(
                    rows, columns, opacity, HELD_OUT + k, photometric, bits_stored=bits,
                    voi=voi, generator="projection",
                )  # fmt: skip
                (c,) = run_on(algorithm, spec, tmp_path).classifications
                (consolidation if opacity else clear).append(c)
    negative = np.mean([not c.positive for c in clear])
    positive = np.mean([c.positive for c in consolidation])
    p_clear = np.array([c.probability for c in clear])
    p_sick = np.array([c.probability for c in consolidation])
    auc = np.mean(p_sick[:, None] > p_clear[None, :])
    assert negative >= 0.6 and positive >= 0.5 and auc >= 0.7, (negative, positive, auc)


@pytest.mark.unit
@pytest.mark.slow
def test_score_does_not_depend_on_the_photometric_interpretation(algorithm, tmp_path) -> None:
    """MONOCHROME1 stores the inverse of MONOCHROME2: the same picture, the same score."""
    for seed, opacity in ((HELD_OUT + 4, False), (HELD_OUT + 5, True)):
        scores = [
            run_on(
                algorithm,
                CxrPhantomSpec(
                    600, 480, opacity, seed, photometric, bits_stored=10, generator="projection"
                ),
                tmp_path,
            )
            .classifications[0]
            .probability
            for photometric in ("MONOCHROME1", "MONOCHROME2")
        ]
        assert scores[0] == pytest.approx(scores[1], abs=0.02), (seed, scores)


@pytest.mark.integration
def test_real_radiograph_and_its_monochrome1_copy(algorithm, corpus: Path, tmp_path) -> None:
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian

    folder = corpus / "cxr-rsna-torchxrayvision" / "tests"
    normal = folder / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    # The same stored values, relabelled MONOCHROME1: displayed as the standard says, it is a
    # negative of the radiograph, not the same picture, so its score may differ (0.61).
    relabelled = folder / "Fake_MONOHR1.dcm"
    result = algorithm.run({"series": SeriesInput("1", (normal,))})
    assert result.heatmaps[0].array.shape == (1024, 1024)
    # The image is SIIM-ACR Pneumothorax's (not RSNA's, whatever the file's provenance note
    # says): its SOP Instance UID heads siim-pneumothorax-train-rle.csv.gz, which ships with
    # torchxrayvision, with EncodedPixels -1 (no pneumothorax). No source labels pneumonia on
    # it; it shows clear lungs, sternotomy wires and a side marker. The demo scored 1.00 on it;
    # it must call it clear (0.44 against a threshold of 0.49).
    (classification,) = result.classifications
    assert not classification.positive, classification
    # A true MONOCHROME1 copy (stored values inverted) is the same picture: the same score.
    inverted = dcmread(normal)
    inverted.PixelData = (255 - inverted.pixel_array).astype(np.uint8).tobytes()
    inverted.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inverted.PhotometricInterpretation = "MONOCHROME1"
    inverted.save_as(tmp_path / "monochrome1.dcm", enforce_file_format=True)
    (same,) = algorithm.run(
        {"series": SeriesInput("1", (tmp_path / "monochrome1.dcm",))}
    ).classifications
    assert same.probability == pytest.approx(classification.probability, abs=0.02)
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


@pytest.mark.unit
@pytest.mark.slow
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


@pytest.mark.unit
def test_weights_that_do_not_fit_are_refused_clearly(tmp_path) -> None:
    small = xrv.models.DenseNet(num_classes=1, growth_rate=8, block_config=(2, 2, 2, 2))
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(WeightsMismatch, match="does not fit torchxrayvision's DenseNet-121"):
        load_network(path, variant="rsna", allow_pickle=False)
    torch.save(small, path)
    with pytest.raises(WeightsMismatch, match="allow_pickle"):
        load_network(path, variant="rsna", allow_pickle=False)


@pytest.mark.integration
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


@pytest.mark.integration
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
