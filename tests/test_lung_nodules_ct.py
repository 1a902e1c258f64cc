"""The CT lung nodule detector: demo accuracy, the anchor grid, bundle compatibility."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import highdicom as hd  # noqa: E402
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape  # noqa: E402

from dicom_node.algorithm import SeriesInput  # noqa: E402
from dicom_node.ct_anatomy import ChestAnatomy  # noqa: E402
from dicom_node.errors import WeightsMismatch  # noqa: E402
from dicom_node.phantoms import CtPhantomSpec, Nodule, write_ct_series  # noqa: E402
from dicom_node.weights import bundle_network  # noqa: E402
from dicom_node_algorithms.lung_nodules_ct import LungNodulesCt  # noqa: E402
from dicom_node_algorithms.lung_nodules_ct.model import (  # noqa: E402
    Detection,
    DetectorParameters,
    LoadedDetector,
    anchor_generator,
    body_box,
    bundle_parser,
    demo_network,
    detect,
    detector_for,
    load_bundle,
    lps_affine,
    nodules,
    preprocess,
    sliding_window,
)
from dicom_node_algorithms.lung_nodules_ct.train_demo import ARCHITECTURE  # noqa: E402
from tests.support.cases import PHANTOMS  # noqa: E402
from tests.support.dicomfiles import CORPUS_SOURCE_WARNINGS, dciodvfy  # noqa: E402
from tests.support.paths import corpus_ct  # noqa: E402


@pytest.fixture(scope="module")
def algorithm() -> LungNodulesCt:
    a = LungNodulesCt()
    a.load("cpu")
    return a


def series_input(paths: list[Path]) -> SeriesInput:
    shuffled = list(paths)
    random.Random(0).shuffle(shuffled)  # the node hands files over in no particular order
    return SeriesInput("1.2.3", tuple(shuffled))


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize("name", PHANTOMS)
def test_demo_weights_find_the_phantom_nodules(algorithm, tmp_path, name) -> None:
    spec = PHANTOMS[name]
    series = series_input(write_ct_series(tmp_path, spec))
    result = algorithm.run({"series": series})
    assert algorithm.weights().demo  # the node marks what it writes DEMO from these
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


@pytest.mark.unit
@pytest.mark.slow
def test_clean_chest_has_no_nodule(algorithm, tmp_path) -> None:
    spec = CtPhantomSpec(slices=40, rows=128, columns=128, noise_hu=20, seed=3)
    result = algorithm.run({"series": series_input(write_ct_series(tmp_path, spec))})
    assert result.findings == [] and result.masks == []
    assert result.measurements["nodule count"] == 0


def clear_chest(seed: int, kernel: str) -> CtPhantomSpec:
    """A 9 x 9 cm view over the left lung of a chest with anatomy (vessels, airways, ribs)."""
    anatomy = ChestAnatomy(seed, offset_mm=(70.0, 0.0, 100.0), kernel=kernel)
    return CtPhantomSpec(
        slices=40, rows=128, columns=128, pixel_spacing_mm=(0.7, 0.7), noise_hu=20, seed=seed,
        anatomy=anatomy,
    )  # fmt: skip


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize(("seed", "kernel"), [(90_001, "soft"), (90_002, "sharp")])
def test_clear_chest_with_vessels_and_ribs_has_no_nodule(algorithm, tmp_path, seed, kernel):
    """Vessels cut across, bronchial walls and ribs are what a real chest CT is full of."""
    spec = clear_chest(seed, kernel)
    result = algorithm.run({"series": series_input(write_ct_series(tmp_path, spec))})
    assert result.findings == [], [(f.center_lps_mm, f.score) for f in result.findings]


@pytest.mark.unit
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["B40f", "B70f"])
def test_real_chest_ct_yields_at_most_a_few_findings(algorithm, corpus: Path, kernel) -> None:
    """Lung-PET-CT-Dx A0002 (Siemens, 30 slices of 8 mm, soft B40f and sharp B70f
    reconstructions of one scan) has one annotated tumour and a chest full of vessels: the
    demo reported 14-15 nodules in each, boxes on vessels, the heart and the chest wall that
    :func:`nodules` now tells from a nodule by their solid part running on out of the box."""
    folder = next((corpus / "chest-ct-lung-pet-ct-dx").rglob(f"*{kernel}*"))
    series = SeriesInput("1.2.3", tuple(sorted(folder.glob("*.dcm"))))
    result = algorithm.run({"series": series})
    assert len(result.findings) <= 3, [(f.center_lps_mm, f.score) for f in result.findings]


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.unit
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


@pytest.mark.unit
@pytest.mark.slow
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


@pytest.mark.unit
def test_detector_parameters_are_the_published_ones(bundle) -> None:
    """The demo detector runs with exactly what the bundle's inference.json says."""
    assert DetectorParameters.from_bundle(bundle_parser(bundle).get()) == DetectorParameters()


@pytest.mark.unit
@pytest.mark.slow
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


@pytest.mark.unit
@pytest.mark.slow
def test_bundle_weights_that_do_not_fit_are_refused_clearly(bundle) -> None:
    torch.save(demo_network(ARCHITECTURE).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(WeightsMismatch, match="does not fit the bundle's network_def"):
        load_bundle(bundle)


@pytest.mark.unit
@pytest.mark.slow
def test_volume_is_preprocessed_as_the_bundle_does(corpus: Path) -> None:
    volume = SeriesInput("1.2.3", tuple(corpus_ct(corpus))).volume()
    image = preprocess(volume, DetectorParameters(), crop_to_body=False)
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
    # Cropped to the body, it lies within the source and only the air in front is left out
    # (the patient fills the field of view from side to side and down to the table).
    cropped = preprocess(volume, DetectorParameters())
    inside = corners(lps_affine(cropped), cropped.shape[1:])
    assert np.all(inside.min(1) >= source.min(1) - 1.3) and np.all(
        inside.max(1) <= source.max(1) + 1.3
    )
    assert np.allclose(np.delete(inside.min(1), 1), np.delete(source.min(1), 1), atol=1.3)


# Thick slices and small pixels: 5 mm and 0.6 mm, neither the bundle's spacing.
THICK_SLICES = CtPhantomSpec(
    slices=12, rows=192, columns=192, pixel_spacing_mm=(0.6, 0.6), slice_thickness_mm=5.0,
    noise_hu=15, nodules=(Nodule((-23.0, 4.0, 30.0), 10.0),),
)  # fmt: skip


@pytest.mark.unit
@pytest.mark.slow
def test_shortcuts_find_the_same_nodule_as_the_bundles_pipeline(algorithm, tmp_path) -> None:
    """Cropping to the body, choosing candidates before decoding boxes and starting from the
    report threshold save time only: the bundle's pipeline (whole field of view, MONAI's own
    post-processing, every candidate) finds the same nodule, centred within a voxel."""
    (nodule,) = THICK_SLICES.nodules
    series = series_input(write_ct_series(tmp_path, THICK_SLICES))
    result = algorithm.run({"series": series})
    parameters = algorithm.loaded.parameters
    volume = series.volume()
    image = preprocess(volume, parameters, crop_to_body=False)
    bundle = LoadedDetector(
        detector_for(algorithm.loaded.network, parameters, candidates_first=False), parameters, True
    )
    reference = nodules(detect(bundle, image), lps_affine(image), volume, threshold=0.5)
    assert len(result.findings) == len(reference) == 1
    voxel = np.array([0.6, 0.6, 5.0])
    (finding,), (expected,) = result.findings, reference
    assert np.all(np.abs(np.subtract(finding.center_lps_mm, expected.center_lps_mm)) <= voxel)
    assert np.all(np.abs(np.subtract(finding.center_lps_mm, nodule.center_lps_mm)) <= voxel)


@pytest.mark.unit
def test_body_box_keeps_the_body_and_a_margin_of_air() -> None:
    hu = np.full((6, 100, 120), -1000.0, dtype=np.float32)
    hu[:, 30:60, 20:90] = 40.0
    hu[2, 10, 10] = -700.0  # lung-like: not the body's edge
    box = body_box(hu, (5.0, 0.5, 0.5), -1024.0, margin_mm=4.0)
    assert box == (slice(0, 6), slice(22, 68), slice(12, 98))
    assert body_box(np.full((3, 8, 8), -1000.0), (1.0, 1.0, 1.0), -1024.0) == (slice(None),) * 3


@pytest.mark.unit
def test_sliding_window_is_a_slab_of_the_cross_section_within_the_patch_budget() -> None:
    parameters = DetectorParameters()  # 512 x 512 x 192 patch, sizes divisible by 16, 16, 8
    assert sliding_window((500, 400, 190), parameters) is None  # fewer voxels than the patch
    # 480 x 368 padded: as many slices as 512 * 512 * 192 voxels allow (284) that make
    # windows start every multiple of 8 slices at 25 % overlap
    assert sliding_window((475, 360, 300), parameters) == (480, 368, 256)
    # a cross-section too large for slabs 192 deep: the bundle's own patch
    assert sliding_window((700, 700, 300), parameters) == (512, 512, 192)
    forced = dataclasses.replace(parameters, force_sliding_window=True)
    assert sliding_window((100, 100, 50), forced) == (512, 512, 192)


@pytest.mark.unit
@pytest.mark.slow
def test_slabs_find_what_the_bundles_windows_find(algorithm, tmp_path) -> None:
    """Slid as slabs or as the bundle's patches (here shrunk so that a small image needs
    several), the network puts the nodule in the same place."""
    volume = series_input(write_ct_series(tmp_path, THICK_SLICES)).volume()
    small = dataclasses.replace(algorithm.loaded.parameters, infer_patch_size=(160, 160, 32))
    image = preprocess(volume, small)
    assert sliding_window(image.shape[1:], small)[2] < image.shape[3]  # several slabs
    network = algorithm.loaded.network
    found = {}
    for forced in (False, True):
        parameters = dataclasses.replace(small, force_sliding_window=forced)
        loaded = LoadedDetector(detector_for(network, parameters), parameters, True)
        found[forced] = nodules(detect(loaded, image), lps_affine(image), volume, threshold=0.5)
    assert len(found[False]) == len(found[True]) == 1
    shift = np.subtract(found[False][0].center_lps_mm, found[True][0].center_lps_mm)
    assert np.all(np.abs(shift) <= [0.6, 0.6, 5.0])


@pytest.mark.unit
def test_only_the_demo_drops_nodules_that_touch_the_chest_wall() -> None:
    """The demo reports only nodules surrounded by lung (its boxes on the heart, chest wall and
    vessels of a real CT); a trained bundle's juxtapleural nodule is a finding and is shown."""
    hu = np.full((40, 40, 40), -850.0, dtype=np.float32)  # lung
    hu[:, :, 31:] = 40.0  # chest wall
    index = np.indices(hu.shape)
    for center in ((20, 20, 27), (20, 20, 12)):  # on the wall, and within the lung
        hu[((index - np.reshape(center, (3, 1, 1, 1))) ** 2).sum(axis=0) <= 16] = 30.0
    source = hd.Volume(hu, np.eye(4), coordinate_system="PATIENT")
    boxes = [Detection((16, 16, 23, 24, 24, 31), 0.9), Detection((16, 16, 8, 24, 24, 16), 0.8)]
    shown = {
        enclosed_only: [
            tuple(np.round(n.center_lps_mm).astype(int))
            for n in nodules(boxes, np.eye(4), source, threshold=0.5, enclosed_only=enclosed_only)
        ]
        for enclosed_only in (True, False)
    }
    assert shown[True] == [(20, 20, 12)]
    assert len(shown[False]) == 2 and shown[False][1] == (20, 20, 12)
