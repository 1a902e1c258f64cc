"""Lung nodule detection: MONAI RetinaNet exactly as in the lung_nodule_ct_detection bundle.

Pre-processing (the bundle's ``preprocessing``): voxel axes to RAS, resampled to
0.703125 x 0.703125 x 1.25 mm, HU [-1024, 300] -> [0, 1]. The detector runs on the whole
volume, through a 512 x 512 x 192 sliding window only when the volume is larger than that
(the bundle's ``RetinaNetInferer``), and keeps boxes by the bundle's selector parameters.
Boxes come out in the voxel coordinates of the resampled image and are mapped to patient LPS
through its affine (the bundle's ``AffineBoxToWorldCoordinated`` with ``affine_lps_to_ras``).

MONAI 1.6 centred the anchors in their grid cells (Project-MONAI/MONAI#8475), half a stride
away from where the public weights learnt them; :class:`TrainedAnchorGenerator` restores
the original grid whatever MONAI version is installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.data import MetaTensor
from monai.data.box_utils import batched_nms, clip_boxes_to_image
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
from monai.networks.blocks.feature_pyramid_network import LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from monai.transforms import Orientation, ScaleIntensityRange, Spacing
from scipy import ndimage
from torch import Tensor

from dicom_node.errors import WeightsMismatch
from dicom_node.weights import (
    bundle_parser,
    load_bundle_network,
    load_demo_checkpoint,
    load_state_strictly,
)

DEMO_FORMAT = "dicom-node-demo-retinanet-v1"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


@dataclass(frozen=True)
class DetectorParameters:
    """What inference.json fixes besides the network; defaults are the published values."""

    pixdim_mm: tuple[float, float, float] = (0.703125, 0.703125, 1.25)
    hu_range: tuple[float, float] = (-1024.0, 300.0)
    feature_map_scales: tuple[int, ...] = (1, 2, 4)
    base_anchor_shapes: tuple[tuple[int, int, int], ...] = ((6, 8, 4), (8, 6, 5), (10, 10, 6))
    size_divisible: tuple[int, int, int] = (16, 16, 8)
    score_thresh: float = 0.02
    topk_candidates_per_level: int = 1000
    nms_thresh: float = 0.22
    detections_per_img: int = 300
    infer_patch_size: tuple[int, int, int] = (512, 512, 192)
    overlap: float = 0.25
    force_sliding_window: bool = False

    @classmethod
    def from_bundle(cls, config: dict[str, Any]) -> DetectorParameters:
        """Read the parameters from a parsed ``configs/inference.json`` of the bundle."""
        transforms = {t["_target_"]: t for t in config["preprocessing"]["transforms"]}
        spacing, scale = transforms["Spacingd"], transforms["ScaleIntensityRanged"]
        anchors = config["anchor_generator"]
        ops = " ".join(config["detector_ops"])
        return cls(
            pixdim_mm=tuple(float(v) for v in spacing["pixdim"]),
            hu_range=(float(scale["a_min"]), float(scale["a_max"])),
            feature_map_scales=tuple(anchors["feature_map_scales"]),
            base_anchor_shapes=tuple(tuple(s) for s in anchors["base_anchor_shapes"]),
            size_divisible=tuple(config["size_divisible"]),
            score_thresh=_call_argument(ops, "score_thresh", float),
            topk_candidates_per_level=_call_argument(ops, "topk_candidates_per_level", int),
            nms_thresh=_call_argument(ops, "nms_thresh", float),
            detections_per_img=_call_argument(ops, "detections_per_img", int),
            infer_patch_size=tuple(config["infer_patch_size"]),
            overlap=_call_argument(ops, "overlap", float),
            force_sliding_window=bool(config.get("force_sliding_window", False)),
        )


def _call_argument(ops: str, name: str, kind: type) -> Any:
    """The literal value of ``name=...`` in the bundle's ``detector_ops`` expressions."""
    match = re.search(rf"\b{name}\s*=\s*([-+0-9.eE]+)", ops)
    if match is None:
        raise WeightsMismatch(f"the bundle's detector_ops do not set {name}")
    return kind(match.group(1))


class TrainedAnchorGenerator(AnchorGeneratorWithAnchorShape):
    """Anchors on the grid the public weights were trained with: cell ``i`` at ``i * stride``.

    MONAI up to 1.5 placed them there; 1.6 adds ``stride // 2`` (PR 8475). Rather than copy
    MONAI's grid code, ask the installed version where it puts the anchors of a one-cell grid
    and take that offset back off, so this is right before and after the change.
    """

    def grid_anchors(
        self, grid_sizes: list[list[int]], strides: list[list[Tensor]]
    ) -> list[Tensor]:
        anchors = super().grid_anchors(grid_sizes, strides)
        one_cell = super().grid_anchors([[1] * self.spatial_dims for _ in strides], strides)
        assert self.cell_anchors is not None  # set by super().grid_anchors' caller
        return [
            level - (origin - cell.to(origin))[:1]
            for level, origin, cell in zip(anchors, one_cell, self.cell_anchors, strict=True)
        ]


def anchor_generator(parameters: DetectorParameters) -> TrainedAnchorGenerator:
    return TrainedAnchorGenerator(
        feature_map_scales=list(parameters.feature_map_scales),
        base_anchor_shapes=[list(s) for s in parameters.base_anchor_shapes],
    )


class CandidatesFirstDetector(RetinaNetDetector):
    """MONAI's RetinaNetDetector, choosing the candidates before decoding their boxes.

    MONAI decodes the box of every anchor (millions on a chest CT: ~2 s and a few hundred MB
    on the CPU) and then keeps the best ``topk_candidates_per_level`` of each level. Boxes are
    decoded row by row, so decoding only the kept rows gives the same boxes.
    """

    def postprocess_detections(
        self,
        head_outputs_reshape: dict[str, Tensor],
        anchors: list[Tensor],
        image_sizes: list[list[int]],
        num_anchor_locs_per_level: Sequence[int],
        need_sigmoid: bool = True,
    ) -> list[dict[str, Tensor]]:
        per_level = [
            locations * self.num_anchors_per_loc for locations in num_anchor_locs_per_level
        ]
        selector = self.box_selector
        detections = []
        for index, size in enumerate(image_sizes):
            logits = head_outputs_reshape[self.cls_key][index].split(per_level)
            regression = head_outputs_reshape[self.box_reg_key][index].split(per_level)
            boxes, scores, labels = [], [], []
            for level_logits, level_regression, level_anchors in zip(
                logits, regression, anchors[index].split(per_level), strict=True
            ):
                kept, level_scores, level_labels = selector.select_top_score_idx_per_level(
                    level_logits
                )
                decoded = self.box_coder.decode_single(
                    level_regression[kept].to(torch.float32), level_anchors[kept]
                )
                decoded, inside = clip_boxes_to_image(decoded, size, remove_empty=True)
                boxes.append(decoded)
                scores.append(level_scores[inside])
                labels.append(level_labels[inside])
            all_boxes, all_scores, all_labels = (
                torch.cat(boxes),
                torch.cat(scores),
                torch.cat(labels),
            )
            keep = batched_nms(
                all_boxes,
                all_scores,
                all_labels,
                selector.nms_thresh,
                box_overlap_metric=selector.box_overlap_metric,
                max_proposals=selector.detections_per_img,
            )
            detections.append(
                {
                    self.target_box_key: all_boxes[keep],
                    self.pred_score_key: all_scores[keep],
                    self.target_label_key: all_labels[keep],
                }
            )
        return detections


def detector_for(
    network: torch.nn.Module,
    parameters: DetectorParameters,
    generator: AnchorGeneratorWithAnchorShape | None = None,
    *,
    candidates_first: bool = True,
) -> RetinaNetDetector:
    """A RetinaNetDetector set up as the bundle's ``detector`` and ``detector_ops``
    (MONAI's own post-processing, decoding every anchor, without ``candidates_first``)."""
    kind = CandidatesFirstDetector if candidates_first else RetinaNetDetector
    detector = kind(
        network=network,
        anchor_generator=generator or anchor_generator(parameters),
        spatial_dims=3,
        num_classes=1,
        size_divisible=list(parameters.size_divisible),
    )
    detector.set_target_keys(box_key="box", label_key="label")
    detector.set_box_selector_parameters(
        score_thresh=parameters.score_thresh,
        topk_candidates_per_level=parameters.topk_candidates_per_level,
        nms_thresh=parameters.nms_thresh,
        detections_per_img=parameters.detections_per_img,
    )
    detector.set_sliding_window_inferer(
        roi_size=list(parameters.infer_patch_size),
        overlap=parameters.overlap,
        sw_batch_size=1,
        mode="constant",
        device="cpu",
    )
    return detector.eval()  # RetinaNetDetector keeps its own train/eval flag


@dataclass
class LoadedDetector:
    detector: RetinaNetDetector
    parameters: DetectorParameters
    demo: bool

    @property
    def network(self) -> torch.nn.Module:
        return self.detector.network


def load_bundle(bundle: Path) -> LoadedDetector:
    """A MONAI bundle folder (configs/ + models/model.pt or model.ts), loaded strictly."""
    parameters = DetectorParameters.from_bundle(bundle_parser(bundle).get())
    network = load_bundle_network(bundle)
    return LoadedDetector(detector_for(network, parameters), parameters, demo=False)


def demo_network(architecture: dict[str, Any]) -> RetinaNet:
    """A RetinaNet with a small ResNet-FPN: the bundle's family at a CPU-trainable size."""
    inplanes = list(architecture["block_inplanes"])
    backbone = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=inplanes,
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=(2, 2, 1),
        conv1_t_size=(7, 7, 7),
    )
    features = BackboneWithFPN(
        backbone,
        return_layers={"layer1": "0", "layer2": "1"},  # the bundle's returned_layers [1, 2]
        in_channels_list=inplanes[:2],
        out_channels=int(architecture["fpn_channels"]),
        spatial_dims=3,
        extra_blocks=LastLevelMaxPool(3),
    )
    return RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=len(DetectorParameters().base_anchor_shapes),
        feature_extractor=features,
        size_divisible=list(DetectorParameters().size_divisible),
        use_list_output=False,
    )


def load_demo(path: Path) -> LoadedDetector:
    checkpoint = load_demo_checkpoint(path, DEMO_FORMAT)
    network = demo_network(json.loads(checkpoint["architecture"]))
    load_state_strictly(network, checkpoint["state_dict"], path, "the demo RetinaNet")
    parameters = DetectorParameters()
    return LoadedDetector(detector_for(network.eval(), parameters), parameters, demo=True)


def preprocess(
    volume: hd.Volume, parameters: DetectorParameters, *, crop_to_body: bool = True
) -> MetaTensor:
    """The bundle's pre-processing of a CT volume in HU: (1, X, Y, Z), RAS, with its affine.

    With ``crop_to_body`` the volume is first cut to the box of voxels denser than air
    (:func:`body_box`) in its own grid, so that neither the resampling nor the network spend
    time on the air around the patient: the grid keeps its spacing and orientation, only its
    origin moves, and boxes map back to the patient through the affine as before.
    """
    array, affine = volume.array, volume.affine
    if crop_to_body:
        box = body_box(array, volume.spacing, parameters.hu_range[0])
        array = array[box]
        affine = affine @ _translation([s.start or 0 for s in box])
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
        affine=torch.from_numpy(LPS_TO_RAS @ affine),
    )
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    # float32 arithmetic: half the time of MONAI's float64 default, the same to 1e-6 of the range
    image = Spacing(pixdim=parameters.pixdim_mm, mode="bilinear", dtype=np.float32)(image)
    low, high = parameters.hu_range
    return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)


def _translation(offset: Sequence[float]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = offset
    return shift


def body_box(
    array: np.ndarray,
    spacing_mm: Sequence[float],
    air_hu: float,
    *,
    above_air_hu: float = 500.0,
    margin_mm: float = 20.0,
) -> tuple[slice, slice, slice]:
    """The part of a CT volume worth looking at: the box of every voxel more than
    ``above_air_hu`` over ``air_hu`` (body, table), with ``margin_mm`` of air around it so that
    the network sees the body's edge as in a full field of view. A volume with nothing denser
    than air is kept whole.
    """
    dense = array > air_hu + above_air_hu
    in_plane = dense.any(axis=0)
    projections = (dense.any(axis=(1, 2)), in_plane.any(axis=1), in_plane.any(axis=0))
    box = []
    for axis, projection in enumerate(projections):
        (present,) = np.nonzero(projection)
        if present.size == 0:
            return (slice(None),) * 3
        margin = int(np.ceil(margin_mm / spacing_mm[axis]))
        stop = min(int(present[-1]) + margin + 1, array.shape[axis])
        box.append(slice(max(int(present[0]) - margin, 0), stop))
    return box[0], box[1], box[2]


def lps_affine(image: MetaTensor) -> np.ndarray:
    """The affine of a pre-processed image, voxel index -> patient LPS mm."""
    return LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)


@dataclass(frozen=True)
class Detection:
    """A box in the pre-processed image's voxel coordinates (x1, y1, z1, x2, y2, z2)."""

    box: tuple[float, ...]
    score: float


def detect(loaded: LoadedDetector, image: MetaTensor, min_score: float = 0.0) -> list[Detection]:
    """Every box the bundle's selector keeps, best first (scores down to its score_thresh, or
    to ``min_score`` when that is higher).

    Raising the floor to the score a reader is shown from gives the same reported boxes: NMS
    lets a box be suppressed only by a better one, and the per-level and per-image limits keep
    the best first. It spares decoding and NMS of thousands of FROC candidates.
    """
    device = next(loaded.network.parameters()).device
    roi = sliding_window(image.shape[1:], loaded.parameters)
    if roi is not None:
        loaded.detector.inferer.roi_size = roi
    pixels = image.as_tensor().to(device)
    selector = loaded.detector.box_selector
    # MONAI keeps scores strictly above its threshold; the float32 just below min_score keeps
    # every float32 score at or above it.
    floor = float(np.nextafter(np.float32(min_score), np.float32(-1.0)))
    published, selector.score_thresh = selector.score_thresh, max(selector.score_thresh, floor)
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            (output,) = loaded.detector([pixels], use_inferer=roi is not None)
    finally:
        selector.score_thresh = published
    boxes = output["box"].float().cpu().numpy()
    scores = output["label_scores"].float().cpu().numpy()
    order = np.argsort(-scores)
    return [Detection(tuple(float(v) for v in boxes[i]), float(scores[i])) for i in order]


def sliding_window(
    shape: Sequence[int], parameters: DetectorParameters
) -> tuple[int, int, int] | None:
    """The window the network is slid with over an image of ``shape`` (X, Y, Z); None for
    the whole image at once.

    The bundle runs the whole image when it has no more voxels than its patch, else slides
    the patch. A chest CT cropped to the body is seldom 512 wide and often 1.3 patches long:
    sliding 512 x 512 x 192 over 480 x 360 x 256 computes four padded windows, 3.6 times the
    image. Here the windows are slabs of the whole (padded) cross-section and as many slices
    as keep a slab within the patch's voxel count, so memory stays bounded as in the bundle;
    only a cross-section too large for slabs as deep as the patch is slid with the patch.
    """
    patch = parameters.infer_patch_size
    budget = int(np.prod(patch))
    if parameters.force_sliding_window:
        return (int(patch[0]), int(patch[1]), int(patch[2]))
    padded = [-(-int(n) // d) * d for n, d in zip(shape, parameters.size_divisible, strict=True)]
    if int(np.prod(shape)) <= budget:
        return None
    cross_section = padded[0] * padded[1]
    step = parameters.size_divisible[2]
    depth = budget // cross_section // step * step
    # MONAI starts windows every int(depth * (1 - overlap)) slices; the output maps of the
    # coarsest level line up only if that is a multiple of its stride
    while depth > 0 and int(depth * (1 - parameters.overlap)) % step:
        depth -= step
    if depth < patch[2]:
        return (int(patch[0]), int(patch[1]), int(patch[2]))
    return (padded[0], padded[1], min(depth, padded[2]))


def box_center_and_size(box: Sequence[float], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (patient LPS mm) and edge lengths (mm) of a box of the pre-processed image."""
    low, high = np.asarray(box[:3]), np.asarray(box[3:])
    center = affine @ np.append((low + high) / 2, 1.0)
    size = (high - low) * np.linalg.norm(affine[:3, :3], axis=0)
    return center[:3], size


@dataclass(frozen=True)
class FoundNodule:
    """A reported nodule: its outline in the source grid, centre of that outline (LPS mm),
    the detector's box size (mm) and score."""

    center_lps_mm: np.ndarray
    size_mm: np.ndarray
    score: float
    mask: np.ndarray


def nodules(
    detections: list[Detection],
    affine: np.ndarray,
    source: hd.Volume,
    *,
    threshold: float,
    solid_above_hu: float = -600.0,
    enclosed_only: bool = False,
) -> list[FoundNodule]:
    """What a reader is shown: boxes scoring at least ``threshold``, each outlined in the
    source grid, best first, and none that outlines a nodule already shown.

    The bundle's NMS (IoU 0.22) keeps nested and neighbouring boxes as separate FROC
    candidates; a reader would see one nodule twice. With ``enclosed_only``, a box whose solid
    part runs on out of its neighbourhood (:func:`nodule_outline`) is taken to be on the
    heart, the chest wall or a vessel, not on a nodule: the demo network, trained on
    phantoms, boxes pieces of those on a real CT. That also drops juxtapleural and
    juxtavascular nodules, so it is for the demo only; a trained bundle's boxes are shown as
    they come. The centre is that of the outline, measured on the source voxels, rather than
    the box's, which the network places only to within its anchor grid.
    """
    found: list[FoundNodule] = []
    shown = np.zeros(source.spatial_shape, dtype=bool)
    for detection in detections:  # best first
        if detection.score < threshold:
            break
        mask, enclosed = nodule_outline(
            detection.box, affine, source, solid_above_hu=solid_above_hu
        )
        count = int(mask.sum())
        if (enclosed_only and not enclosed) or count == 0 or (mask & shown).sum() > count / 2:
            continue
        shown |= mask
        _, size = box_center_and_size(detection.box, affine)
        centroid = np.argwhere(mask).mean(axis=0)
        center = (source.affine @ np.append(centroid, 1.0))[:3]
        found.append(FoundNodule(center, size, detection.score, mask))
    return found


def nodule_outline(
    box: Sequence[float],
    affine: np.ndarray,
    source: hd.Volume,
    *,
    solid_above_hu: float = -600.0,
    reach: float = 2.5,
) -> tuple[np.ndarray, bool]:
    """The nodule in the source grid: the solid (above ``solid_above_hu``) connected part
    that most overlaps the ellipsoid inscribed in the box, looked for within ``reach`` times
    the ellipsoid's radii so that a box a little off, or smaller than the nodule, still
    outlines the whole nodule. With no solid voxel there (a ground-glass nodule) the
    ellipsoid itself is the outline.

    Also whether that part is enclosed: it stays off the outer tenth of that neighbourhood.
    A part reaching there runs on well beyond the box (the heart, the chest wall, a vessel
    running through) rather than being a nodule the box holds. A nodule touching a vessel
    or the pleura is not enclosed either: the demo does not report those.

    Only the source voxels around the box are visited.
    """
    low, high = np.asarray(box[:3]), np.asarray(box[3:])
    center, radius = (low + high) / 2, np.maximum((high - low) / 2, 0.5)
    far = radius * reach
    corners = np.array(
        np.meshgrid(*zip(center - far, center + far, strict=True), indexing="ij")
    ).reshape(3, -1)
    to_source = source.inverse_affine @ affine
    reach_idx = to_source[:3, :3] @ corners + to_source[:3, 3:4]
    start = np.clip(np.floor(reach_idx.min(axis=1)).astype(int), 0, None)
    stop = np.minimum(np.ceil(reach_idx.max(axis=1)).astype(int) + 1, source.spatial_shape)
    mask = np.zeros(source.spatial_shape, dtype=bool)
    if np.any(stop <= start):
        return mask, False
    grid = np.stack(
        np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop, strict=True)), indexing="ij")
    )
    to_image = np.linalg.inv(to_source)
    points = np.tensordot(to_image[:3, :3], grid, axes=1) + to_image[:3, 3, None, None, None]
    distance = np.sqrt(
        (((points - center[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(axis=0)
    )
    region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    inside = distance <= 1.0
    labels, _ = ndimage.label((distance <= reach) & (source.array[region] > solid_above_hu))
    overlap = np.bincount(labels[inside], minlength=labels.max() + 1)
    overlap[0] = 0
    if not overlap.any():
        mask[region] = inside
        return mask, True
    part = labels == int(np.argmax(overlap))
    mask[region] = part
    return mask, not np.any(part & (distance > 0.9 * reach))
