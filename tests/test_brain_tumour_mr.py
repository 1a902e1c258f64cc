"""The MR brain tumour algorithm: demo accuracy on phantoms, bundle compatibility, geometry."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import highdicom as hd  # noqa: E402

from dicom_node.algorithm import SeriesInput  # noqa: E402
from dicom_node.errors import WeightsMismatch  # noqa: E402
from dicom_node.phantoms import BrainPhantomSpec, write_brain_study  # noqa: E402
from dicom_node.weights import bundle_network  # noqa: E402
from dicom_node_algorithms.brain_tumour_mr import BrainTumourMr  # noqa: E402
from dicom_node_algorithms.brain_tumour_mr.model import REGIONS, load_bundle  # noqa: E402
from tests.support.dicomfiles import dciodvfy  # noqa: E402

UNSEEN = 900_000  # far from the training (0-31) and held-out (50000-50005) seeds


@pytest.fixture(scope="module")
def algorithm() -> BrainTumourMr:
    a = BrainTumourMr()
    a.load("cpu")
    return a


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def study_inputs(folder: Path) -> dict[str, SeriesInput]:
    """The roles as the node hands them over: files in no particular order."""
    inputs = {}
    for role in ("T1c", "T1", "T2", "FLAIR"):
        paths = sorted((folder / role).glob("*.dcm"))
        random.Random(role).shuffle(paths)
        inputs[role] = SeriesInput(role, tuple(paths))
    return inputs


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        BrainPhantomSpec(seed=UNSEEN),
        BrainPhantomSpec(seed=UNSEEN + 1, reversed_order=True),
        BrainPhantomSpec(seed=UNSEEN + 2, spacing_mm=(3.0, 2.7, 3.3)),
        BrainPhantomSpec(seed=UNSEEN + 3, spacing_mm=(3.0, 3.3, 2.8), reversed_order=True),
    ],
    ids=["axial", "reversed", "non-square", "non-square-reversed"],
)
def test_demo_weights_segment_the_phantom_tumour(algorithm, tmp_path, spec) -> None:
    phantom = write_brain_study(tmp_path, spec)
    inputs = study_inputs(tmp_path)
    result = algorithm.run(inputs)
    assert algorithm.weights().demo  # the node marks what it writes DEMO from these
    t1c = inputs["T1c"].volume()
    truths = (phantom.tumour_core, phantom.whole_tumour, phantom.enhancing_tumour)
    for region, mask, truth in zip(REGIONS, result.masks, truths, strict=True):
        assert mask.name == region and mask.source == "T1c"
        assert mask.array.shape == t1c.spatial_shape
        # The truth placed by the phantom's own geometry, onto the T1c series' volume grid.
        expected = hd.Volume(
            truth.astype(np.uint8), phantom.affine, "PATIENT", t1c.frame_of_reference_uid
        ).match_geometry(t1c)
        score = dice(mask.array, expected.array.astype(bool))
        assert score >= 0.8, f"{region}: Dice {score:.3f}"
        volume_ml = result.measurements[f"{region} volume_ml"]
        assert volume_ml == pytest.approx(mask.array.sum() * np.prod(spec.spacing_mm) / 1000, 1e-3)


@pytest.mark.unit
@pytest.mark.slow
def test_no_tumour_no_mask(algorithm, tmp_path) -> None:
    write_brain_study(tmp_path, BrainPhantomSpec(seed=UNSEEN + 5, tumour=False))
    result = algorithm.run(study_inputs(tmp_path))
    assert result.measurements["whole tumour volume_ml"] < 1.0


@pytest.mark.unit
def test_series_from_another_frame_of_reference_are_refused(algorithm, tmp_path) -> None:
    write_brain_study(tmp_path / "a", BrainPhantomSpec(seed=UNSEEN + 6))
    write_brain_study(tmp_path / "b", BrainPhantomSpec(seed=UNSEEN + 6))
    inputs = study_inputs(tmp_path / "a")
    inputs["FLAIR"] = study_inputs(tmp_path / "b")["FLAIR"]
    with pytest.raises(ValueError, match="frames of reference"):
        algorithm.run(inputs)


@pytest.fixture
def bundle(bundle_like) -> Path:
    return bundle_like("brats_mri_segmentation")


@pytest.mark.unit
@pytest.mark.slow
def test_public_bundle_loads_strictly_and_matches_the_reference(bundle) -> None:
    torch.manual_seed(2)
    reference = bundle_network(bundle).eval()  # built by MONAI's ConfigParser from the config
    torch.save(reference.state_dict(), bundle / "models" / "model.pt")
    algorithm = BrainTumourMr({"bundle": str(bundle)})
    assert not algorithm.weights().demo
    algorithm.load("cpu")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert algorithm.loaded.roi_size == tuple(config["inferer"]["roi_size"]) == (240, 240, 160)
    assert algorithm.loaded.overlap == config["inferer"]["overlap"]
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(algorithm.loaded.network(x), reference(x))


@pytest.mark.unit
def test_bundle_weights_that_do_not_fit_are_refused_clearly(bundle) -> None:
    state = bundle_network(bundle).state_dict()
    state.pop(next(iter(state)))
    torch.save(state, bundle / "models" / "model.pt")
    with pytest.raises(WeightsMismatch, match="does not fit the bundle's network_def"):
        load_bundle(bundle)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model\.pt nor model\.ts"):
        BrainTumourMr({"bundle": str(bundle)}).weights()


@pytest.mark.integration
def test_node_routes_a_four_sequence_study_and_segments_it(make_node, tmp_path) -> None:
    from dicom_node.scu import send

    node = make_node(assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1})
    phantom = write_brain_study(tmp_path / "study", BrainPhantomSpec(seed=UNSEEN + 7))
    assert len(send([tmp_path / "study"], "127.0.0.1", node.port).sent) == 4 * 32
    ((result, folder),) = node.results(1)
    assert result["algorithm"] == "brain-tumour-mr" and result["demo"]
    assert [m["name"] for m in result["masks"]] == list(REGIONS)
    whole = np.load(folder / result["masks"][1]["file"])
    assert whole.shape == (32, 64, 64)
    truth_ml = phantom.whole_tumour.sum() * 27 / 1000
    assert result["measurements"]["whole tumour volume_ml"] == pytest.approx(truth_ml, rel=0.2)
    outputs = node.outputs()
    assert set(outputs) == {"SEG", "SR"}
    for path in outputs.values():
        assert dciodvfy(path) == [], path.name
    seg = hd.seg.segread(outputs["SEG"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(REGIONS)
    # The T1c series is the source; the other three sequences are further sources.
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert len(referenced) == 4


@pytest.mark.unit
def test_series_on_other_grids_are_resampled_through_patient_space() -> None:
    """A linear ramp in patient x survives trilinear resampling exactly, so the resampled
    values say where each target voxel was looked up; the same grid reordered is exact."""
    from dicom_node_algorithms.brain_tumour_mr.model import resample_onto

    target = hd.Volume(np.zeros((6, 8, 8), np.float32), np.diag([3.0, 2.0, 2.0, 1.0]), "PATIENT")
    affine = np.diag([2.5, 1.5, 1.0, 1.0])
    affine[:3, 3] = (1.0, 0.75, 0.5)  # a different grid, offset by fractions of a voxel
    i = np.arange(12)[:, None, None] * np.ones((12, 16, 20))
    x = affine[0, 0] * i + affine[0, 3]  # patient x of each source voxel
    source = hd.Volume(x.astype(np.float32), affine, "PATIENT")
    resampled = resample_onto(source, target)
    expected = 3.0 * np.arange(6)[:, None, None] * np.ones((6, 8, 8))
    # Target voxels at x, y or z = 0 lie before the source's first voxel centre: outside.
    assert np.allclose(resampled[1:, 1:, 1:], expected[1:, 1:, 1:], atol=1e-4)
    assert np.all(resampled[0] == 0)
    flipped = target.with_array(np.random.default_rng(0).random((6, 8, 8)).astype(np.float32))
    assert np.array_equal(resample_onto(flipped.flip_spatial((0, 2)), flipped), flipped.array)


@pytest.mark.integration
def test_run_matches_roles_in_a_study_folder_like_the_node(tmp_path) -> None:
    """`dicom-node run STUDY --algorithm brain-tumour-mr` reads the folder's headers, gives
    the roles as the node does (acquisition attributes, decoys passed over) and says why."""
    import subprocess
    import sys

    from tests.support.cases import decoy_study

    uids = decoy_study(tmp_path / "study", BrainPhantomSpec(seed=UNSEEN + 8))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dicom_node", "run", str(tmp_path / "study")]
    command += ["--algorithm", "brain-tumour-mr", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    assert len([line for line in lines if line.startswith("series ")]) == len(uids) == 8
    assert lines["series 3 'sT2/TSE/T'"].startswith("series 3 'sT2/TSE/T': T2 (spin echo")
    assert "FLAIR (inversion recovery" in lines["series 4 'T2W_FLAIR'"]
    assert "T1c (" in lines["series 1 'T1W_3D_TFE +C'"]
    assert "no role (never a role: a mask" in lines["series 9 'FLAIR_ROI'"]
    assert "no role (passed over: echo-planar" in lines["series 7 'T2W/FE-EPI'"]
    assert "diffusion" in lines["series 5 'Ax DWI 1000b'"]
    assert "localizer" in lines["series 6 '3-Plane Loc'"]
    result = json.loads((out / "case-001" / "result.json").read_text())
    assert result["algorithm"] == "brain-tumour-mr"
    assert result["measurements"]["whole tumour volume_ml"] > 1.0


@pytest.mark.integration
def test_run_says_which_role_is_missing(tmp_path) -> None:
    import subprocess
    import sys

    write_brain_study(tmp_path / "study", BrainPhantomSpec(seed=UNSEEN + 9, frames=4))
    for path in (tmp_path / "study" / "FLAIR").glob("*.dcm"):
        path.unlink()
    command = [sys.executable, "-m", "dicom_node", "run", str(tmp_path / "study")]
    command += ["--algorithm", "brain-tumour-mr", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1
    assert "brain-tumour-mr: missing role(s) FLAIR" in done.stderr
    assert "series 3 'AX T2 TSE': T2 (" in done.stdout
