"""The CT lung nodule detector: demo accuracy, the anchor grid, bundle compatibility."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import highdicom as hd  # noqa: E402
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape  # noqa: E402

from algorithms.lung_nodules_ct import LungNodulesCt  # noqa: E402
from algorithms.lung_nodules_ct.model import (  # noqa: E402
    DetectorParameters,
    LoadedDetector,
    anchor_generator,
    bundle_parser,
    demo_network,
    detect,
    detector_for,
    load_bundle,
    lps_affine,
    preprocess,
)
from algorithms.lung_nodules_ct.train_demo import ARCHITECTURE  # noqa: E402
from dicom_node.algorithm import SeriesInput  # noqa: E402
from dicom_node.phantoms import CtPhantomSpec, Nodule, write_ct_series  # noqa: E402
from dicom_node.weights import WeightsMismatch, bundle_network  # noqa: E402
from tests.dicomfiles import CORPUS_SOURCE_WARNINGS, dciodvfy  # noqa: E402
from tests.test_algorithms import corpus_ct  # noqa: E402


@pytest.fixture(scope="module")
def algorithm() -> LungNodulesCt:
    a = LungNodulesCt()
    a.load("cpu")
    return a


def series_input(paths: list[Path]) -> SeriesInput:
    shuffled = list(paths)
    random.Random(0).shuffle(shuffled)  # the node hands files over in no particular order
    return SeriesInput("1.2.3", tuple(shuffled))


PHANTOMS = {
    "axial": CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.75, 0.75), noise_hu=20,
        nodules=(Nodule((-27.0, 4.0, 24.0), 9.0),),
    ),
    "reversed": CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.7, 0.7), noise_hu=15,
        nodules=(Nodule((22.0, -8.0, 30.0), 7.0),), reversed_order=True,
    ),
    "non-square": CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.85, 0.68), noise_hu=25,
        nodules=(Nodule((-18.0, 10.0, 20.0), 10.0), Nodule((20.0, -5.0, 32.0), 8.0)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", PHANTOMS)
def test_demo_weights_find_the_phantom_nodules(algorithm, tmp_path, name) -> None:
    spec = PHANTOMS[name]
    series = series_input(write_ct_series(tmp_path, spec))
    result = algorithm.run({"series": series})
    assert result.demo
    assert len(result.findings) == len(spec.nodules), result.findings
    volume = series.volume()
    row_mm, column_mm = spec.pixel_spacing_mm
    voxel = np.array([column_mm, row_mm, spec.slice_thickness_mm])  # along L, P, S
    truth_mask = hd.Volume(
        spec.nodule_mask().astype(np.uint8), spec.affine(), "PATIENT", volume.frame_of_reference_uid
    ).match_geometry(volume)
    for nodule in spec.nodules:
        finding = min(
            result.findings,
            key=lambda f: np.linalg.norm(np.subtract(f.center_lps_mm, nodule.center_lps_mm)),
        )
        error = np.abs(np.subtract(finding.center_lps_mm, nodule.center_lps_mm)) / voxel
        assert error.max() <= 1.5, f"{name}: centre {error} voxels off"
        assert np.allclose(finding.size_mm, nodule.diameter_mm, rtol=0.35), finding.size_mm
        # Its outline is in the source grid and lies on the nodule.
        (mask,) = [m for m in result.masks if m.name == finding.mask]
        assert mask.array.shape == volume.spatial_shape
        overlap = (mask.array & truth_mask.array.astype(bool)).sum() / mask.array.sum()
        assert overlap >= 0.8


def test_clean_chest_has_no_nodule(algorithm, tmp_path) -> None:
    spec = CtPhantomSpec(slices=40, rows=128, columns=128, noise_hu=20, seed=3)
    result = algorithm.run({"series": series_input(write_ct_series(tmp_path, spec))})
    assert result.findings == [] and result.masks == []
    assert result.measurements["nodule count"] == 0


def test_real_chest_ct_runs_end_to_end(algorithm, corpus: Path, tmp_path: Path) -> None:
    """The corpus CT is 30 slices of ~5 mm: smaller than the training patch, still valid,
    and its result is valid DICOM (an SR saying "Nodule: absent" when nothing is found)."""
    from dicom_node.config import ResultsConfig
    from dicom_node.write import Provenance, write_all

    series = SeriesInput("1.2.3", tuple(corpus_ct(corpus)))
    result = algorithm.run({"series": series})
    for finding, mask in zip(result.findings, result.masks, strict=True):
        assert mask.array.shape == (30, 512, 512) and mask.array.any()
        assert finding.mask == mask.name
    provenance = Provenance(algorithm.name, algorithm.version, algorithm.weights())
    written = write_all(result, {"series": series}, provenance, tmp_path, ResultsConfig())
    assert "SR" in {w.kind for w in written}
    for w in written:
        assert dciodvfy(w.path, from_source=CORPUS_SOURCE_WARNINGS) == [], w.path.name


def test_node_routes_a_chest_ct_and_finds_its_nodule(make_node, tmp_path) -> None:
    from dicom_node.scu import send

    node = make_node(assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1})
    spec = PHANTOMS["axial"]
    assert len(send(write_ct_series(tmp_path / "ct", spec), "127.0.0.1", node.port).sent) == 40
    ((result, folder),) = node.results(1)
    assert result["algorithm"] == "lung-nodules-ct" and result["demo"]
    (finding,) = result["findings"]
    assert np.allclose(finding["center_lps_mm"], spec.nodules[0].center_lps_mm, atol=1.0)
    mask = np.load(folder / result["masks"][0]["file"])
    assert mask.shape == (40, 128, 128) and mask.any()
    outputs = node.outputs()
    assert set(outputs) == {"SEG", "SR"}
    for path in outputs.values():
        assert dciodvfy(path) == [], path.name
    seg = hd.seg.segread(outputs["SEG"])
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
    assert seg.SeriesDescription.startswith("DEMO MODEL - NOT FOR CLINICAL USE")


def test_anchor_grid_is_the_one_the_weights_were_trained_on() -> None:
    """Cell (i, j, k) of a level with stride s has its anchors centred at (i, j, k) * s,
    as in MONAI before 1.6 where the public weights were trained (PR 8475 moved them)."""
    parameters = DetectorParameters()
    ours = anchor_generator(parameters)
    stock = AnchorGeneratorWithAnchorShape(
        feature_map_scales=list(parameters.feature_map_scales),
        base_anchor_shapes=[list(s) for s in parameters.base_anchor_shapes],
    )
    image = torch.zeros(1, 1, 64, 64, 32)
    shapes = [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    features = [torch.zeros(1, 3, *shape) for shape in shapes]
    (anchors,) = ours(image, features)
    (moved,) = stock(image, features)
    start = 0
    for (gx, gy, gz), scale in zip(shapes, parameters.feature_map_scales, strict=True):
        stride = np.array([64 // gx, 64 // gy, 32 // gz])
        cells = np.stack(np.meshgrid(range(gx), range(gy), range(gz), indexing="ij"), -1)
        cells = cells.reshape(-1, 1, 3)
        # half extents per anchor, rounded half to even as MONAI rounds its cell anchors
        base = np.round(np.array(parameters.base_anchor_shapes) * scale / 2)
        expected = np.concatenate([cells * stride - base, cells * stride + base], -1)
        count = expected.shape[0] * expected.shape[1]
        level = anchors[start : start + count].numpy()
        assert np.allclose(level, expected.reshape(-1, 6))
        # The installed MONAI centres them in the cell when it is 1.6 or newer.
        offset = (moved[start : start + count] - anchors[start : start + count]).numpy()
        assert np.allclose(offset, np.tile(stride // 2, 2)) or np.allclose(offset, 0)
        start += count
    assert start == len(anchors)


def test_anchor_grid_moves_detections_by_half_a_stride(algorithm, tmp_path) -> None:
    """With MONAI's centred anchors the same network puts boxes half a stride away: the
    shift the fix undoes. The finest level's stride is (4, 4, 2) voxels of 0.7/1.25 mm."""
    spec = PHANTOMS["axial"]
    image = preprocess(SeriesInput("1", tuple(write_ct_series(tmp_path, spec))).volume(),
                       algorithm.loaded.parameters)  # fmt: skip
    ours = detect(algorithm.loaded, image)[0]
    parameters = algorithm.loaded.parameters
    centred = AnchorGeneratorWithAnchorShape(
        feature_map_scales=list(parameters.feature_map_scales),
        base_anchor_shapes=[list(s) for s in parameters.base_anchor_shapes],
    )
    stock = LoadedDetector(
        detector_for(algorithm.loaded.network, parameters, centred), parameters, True
    )
    theirs = detect(stock, image)[0]
    shift = (np.add(theirs.box[3:], theirs.box[:3]) - np.add(ours.box[3:], ours.box[:3])) / 2
    import monai

    if tuple(int(v) for v in monai.__version__.split(".")[:2]) >= (1, 6):
        strides = [np.array([4, 4, 2]) * scale for scale in parameters.feature_map_scales]
        assert any(np.allclose(shift, stride // 2, atol=0.05) for stride in strides), shift
    else:
        assert np.allclose(shift, 0), shift


@pytest.fixture
def bundle(bundle_like) -> Path:
    return bundle_like("lung_nodule_ct_detection")


def test_detector_parameters_are_the_published_ones(bundle) -> None:
    """The demo detector runs with exactly what the bundle's inference.json says."""
    assert DetectorParameters.from_bundle(bundle_parser(bundle).get()) == DetectorParameters()


def test_public_bundle_loads_strictly_and_matches_the_reference(bundle) -> None:
    torch.manual_seed(3)
    reference = bundle_network(bundle).eval()  # RetinaNet + ResNet-50 FPN from the config
    torch.save({"model": reference.state_dict()}, bundle / "models" / "model.pt")
    algorithm = LungNodulesCt({"bundle": str(bundle)})
    assert not algorithm.weights().demo
    algorithm.load("cpu")
    network = algorithm.loaded.network
    assert sum(p.numel() for p in network.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        got, expected = network(x), reference(x)
    for key in ("classification", "box_regression"):
        for a, b in zip(got[key], expected[key], strict=True):
            assert torch.equal(a, b)


def test_bundle_weights_that_do_not_fit_are_refused_clearly(bundle) -> None:
    torch.save(demo_network(ARCHITECTURE).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(WeightsMismatch, match="does not fit the bundle's network_def"):
        load_bundle(bundle)


def test_volume_is_preprocessed_as_the_bundle_does(corpus: Path) -> None:
    volume = SeriesInput("1.2.3", tuple(corpus_ct(corpus))).volume()
    image = preprocess(volume, DetectorParameters())
    affine = lps_affine(image)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), (0.703125, 0.703125, 1.25))
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # RAS voxel axes: x runs to the patient's right (LPS x falls), y anterior, z superior.
    assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0

    # Same patient-space extent as the source, within a voxel.
    def corners(affine: np.ndarray, shape) -> np.ndarray:
        grid = np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")
        points = np.stack([*(g.ravel() for g in grid), np.ones(8)])
        return (affine @ points)[:3]

    source, resampled = (
        corners(volume.affine, volume.spatial_shape),
        corners(affine, image.shape[1:]),
    )
    assert np.allclose(source.min(1), resampled.min(1), atol=1.3)
