"""The worked example of docs/authoring.md (docs/example-plugin): installed by pip as a real
package, found through its entry point, routed to by a rule, run by the node's worker, and
written as a SEG and an SR whose voxels and volumes are the phantom's lungs; and run offline by
``dicom-node run``.

The truth comes from the phantom's own values (its lungs are the voxels it fills with -850 HU,
right and left by the patient x of their centres), never from the algorithm's code.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.algorithm import SeriesInput
from dicom_node.config import ResultsConfig
from dicom_node.phantoms import CtPhantomSpec, ct_series, write_ct_series
from dicom_node.plugins import discover
from dicom_node.write import Provenance, write_all
from tests.support.dicomfiles import dciodvfy, storescu_acknowledged
from tests.support.paths import ROOT

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "docs" / "example-plugin"
NAME = "lung-threshold-ct"
PACKAGE = "lung_threshold_ct"
# Small enough for seconds on two cores, with the phantom's noise so the threshold is tested.
SPEC = CtPhantomSpec(
    slices=24,
    rows=64,
    columns=64,
    pixel_spacing_mm=(3.0, 3.0),
    slice_thickness_mm=5.0,
    noise_hu=30.0,
    seed=7,
)
LUNG_HU = -850  # what dicom_node.phantoms fills its lungs with
VOXEL_ML = SPEC.pixel_spacing_mm[0] * SPEC.pixel_spacing_mm[1] * SPEC.slice_thickness_mm / 1000
SCT_VOLUME = "118565006"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed by the venv's pip into a folder of its own, wheel and all."""
    work = tmp_path_factory.mktemp("example-plugin")
    # pip builds in the source folder (build/, *.egg-info): a copy keeps the repository clean.
    source = work / "source"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = work / "site-packages"
    pip = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"),
            *("--no-index", "--quiet", "--target", str(target), str(source)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / PACKAGE / "__init__.py").is_file()
    return target


def plugin_env(site: Path) -> dict[str, str]:
    """The environment of a node whose Python finds the installed package (entry points are
    read by importlib.metadata from every folder on sys.path)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *sys.path]),
        # The algorithm ignores the device; "cpu" spares each process importing torch to ask.
        "DICOM_NODE__WORKER__DEVICE": "cpu",
    }


@pytest.fixture
def on_path(installed: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(installed))
    importlib.invalidate_caches()
    yield
    sys.modules.pop(PACKAGE, None)


def truth(spec: CtPhantomSpec = SPEC) -> tuple[np.ndarray, np.ndarray]:
    """(right lung, left lung) per slice in acquisition order, from the noise-free phantom."""
    clean = list(ct_series(replace(spec, noise_hu=0.0)))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + ds.RescaleIntercept for ds in clean])
    lungs = hu == LUNG_HU
    indices = np.indices(lungs.shape).reshape(3, -1)
    x = (spec.affine()[0, :3] @ indices + spec.affine()[0, 3]).reshape(lungs.shape)
    # The phantom is centred on x = 0 and its lungs lie well apart from it; +x is the left.
    return lungs & (x < 0), lungs & (x > 0)


def in_grid_of(mask: np.ndarray, volume: hd.Volume) -> np.ndarray:
    """A truth mask in acquisition order moved into ``volume``'s grid (highdicom's order)."""
    moved = hd.Volume(
        mask.astype(np.uint8), SPEC.affine(), "PATIENT", volume.frame_of_reference_uid
    )
    return moved.match_geometry(volume).array.astype(bool)


def volumes_ml(sr: Dataset) -> list[float]:
    """Every Volume (SCT 118565006) NUM in the SR content tree, in document order."""
    found = []
    for item in sr.get("ContentSequence") or []:
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "NUM" and name and name[0].CodeValue == SCT_VOLUME:
            (value,) = item.MeasuredValueSequence
            assert value.MeasurementUnitsCodeSequence[0].CodeValue == "mL"
            found.append(float(value.NumericValue))
        found += volumes_ml(item)
    return found


def test_algorithm_segments_the_phantom_lungs(on_path: None, tmp_path: Path) -> None:
    """The unit test an author writes first: run() on a phantom, then the node's writers."""
    registration = discover()[NAME]
    assert registration.algorithm is not None, registration.error
    assert registration.target == f"{PACKAGE}:LungThresholdCt"
    algorithm = registration.algorithm({})
    assert algorithm.weights().describe() == "no weights" and not algorithm.weights().demo
    algorithm.load("cpu")
    series = SeriesInput("phantom", tuple(write_ct_series(tmp_path / "ct", SPEC)))
    result = algorithm.run({"series": series})

    assert [m.name for m in result.masks] == ["Right lung", "Left lung"]
    volume = series.volume()
    for mask, expected in zip(result.masks, truth(), strict=True):
        assert np.array_equal(mask.array, in_grid_of(expected, volume)), mask.name
        assert result.measurements[f"{mask.name.lower()} volume_ml"] == pytest.approx(
            expected.sum() * VOXEL_ML
        )
    provenance = Provenance(algorithm.name, algorithm.version, algorithm.weights())
    written = write_all(result, {"series": series}, provenance, tmp_path / "out", ResultsConfig())
    assert [w.kind for w in written] == ["SEG", "SR"]
    for w in written:
        assert dciodvfy(w.path) == [], w.path.name

    # Settings are checked when the class is built, so `dicom-node algorithms` shows a typo.
    with pytest.raises(ValueError, match="unknown setting"):
        registration.algorithm({"threshold": -400})
    with pytest.raises(ValueError, match="threshold_hu"):
        registration.algorithm({"threshold_hu": 300})


def test_node_routes_ct_to_the_installed_plugin_and_writes_its_seg(
    installed: Path, make_node, tmp_path: Path
) -> None:
    env = plugin_env(installed)
    listing = subprocess.run(
        [sys.executable, "-m", "dicom_node", "algorithms", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stdout + listing.stderr  # nothing broken
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows[NAME]["entry_point"] == f"{PACKAGE}:LungThresholdCt"
    assert (rows[NAME]["version"], rows[NAME]["inputs"]) == ("1.0.0", ["series"])
    assert rows[NAME]["weights"] == "no weights"

    rule = {"algorithm": NAME, "series": {"modality": ["CT"], "orientation": ["axial"]}}
    node = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        routing={"rules": [rule]},
        env=env,
    )
    files = write_ct_series(tmp_path / "ct", SPEC)
    sent = node.storescu("-v", files=files)
    assert len(storescu_acknowledged(sent.stdout + sent.stderr)) == len(files), sent.stderr
    ((result, _),) = node.results(1, timeout_s=60)
    assert result["algorithm"] == NAME and result["demo"] is False
    (summary,) = node.query("SELECT summary FROM routing_decisions WHERE level = 'series'")
    assert summary[0] == f"routed to {NAME}"

    outputs = node.outputs()
    assert set(outputs) == {"SEG", "SR"}
    for path in outputs.values():
        assert dciodvfy(path) == [], path.name
    sources = [dcmread(f, stop_before_pixels=True) for f in files]  # acquisition order
    seg = hd.seg.segread(outputs["SEG"])
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    # The source series' number and description carried over (issue 14, item 6); no DEMO.
    number, described = int(sources[0].SeriesNumber), sources[0].SeriesDescription
    assert (seg.SeriesNumber, seg.SeriesDescription) == (
        number * 100 + 1,
        f"AI {NAME} SEG: {described}",
    )
    assert seg.SegmentationType == "BINARY"
    segments = [
        (s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for s in seg.SegmentSequence
    ]
    assert segments == [("Right lung", "3341006"), ("Left lung", "44029006")]
    # Voxel for voxel, each frame read back through the source image it names.
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], assert_missing_frames_are_empty=True
    )
    right, left = truth()
    assert np.array_equal(pixels[..., 0].astype(bool), right)
    assert np.array_equal(pixels[..., 1].astype(bool), left)

    sr = dcmread(outputs["SR"])
    assert sr.SeriesNumber == number * 100 + 2
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    expected = [right.sum() * VOXEL_ML, left.sum() * VOXEL_ML]
    assert volumes_ml(sr) == pytest.approx(expected, abs=1e-3)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def test_dicom_node_run_offline(installed: Path, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", SPEC)
    out = tmp_path / "out"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "dicom_node", "run", str(tmp_path / "ct")),
            *("--algorithm", NAME, "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        env=plugin_env(installed),
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads((out / "case-001" / "result.json").read_text())
    assert document["algorithm"] == NAME and document["demo"] is False
    volume = SeriesInput("phantom", tuple(files)).volume()
    for saved, expected in zip(document["masks"], truth(), strict=True):
        mask = np.load(out / "case-001" / saved["file"])
        assert np.array_equal(mask, in_grid_of(expected, volume)), saved["name"]
        assert saved["voxels"] == int(expected.sum())
        key = f"{saved['name'].lower()} volume_ml"
        assert document["measurements"][key] == pytest.approx(expected.sum() * VOXEL_ML)
