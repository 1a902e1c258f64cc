"""Follow-up of lesions between a prior and a current scan of one patient: rigid registration
of the two volumes, matching of their lesions, and what changed (new, resolved, growing,
shrinking, stable, volume doubling time).

A helper library for algorithms, like :mod:`dicom_node.phantoms`: it takes and returns plain
data (highdicom volumes, centres in patient LPS mm) and knows nothing of networking or DICOM
writing. The registration is SimpleITK's (ITK's registration framework): a rigid Euler 3D
transform found by Mattes mutual information on both volumes resampled to a coarse isotropic
grid, multi-resolution. Mutual information rather than a difference of intensities because two
scanners (or two reconstructions) need not give a tissue the same value; rigid because the
chest moves as a whole between two visits far more than it deforms at the scale of a nodule's
match tolerance.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.algorithm import FindingChange, LesionStatus

if TYPE_CHECKING:
    import highdicom as hd

# Volume change within which a lesion counts as stable: 25 % is the change volumetry can tell
# from measurement variation (NELSON trial; the BTS 2015 nodule guideline).
STABLE_PERCENT = 25.0
# A prior lesion matches a current one within the larger of this and either's diameter.
MIN_TOLERANCE_MM = 10.0
# The grid the registration works on (mm): coarse enough for seconds on a CPU.
REGISTRATION_SPACING_MM = 3.0
# Intensities outside this range (metal, contrast, bone cortex) say nothing more about pose.
_CLAMP_HU = (-1024.0, 600.0)


@dataclass(frozen=True)
class Lesion:
    """One lesion at one time point: centre (patient LPS mm), long-axis diameter (mm), volume
    (mm3)."""

    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float


@dataclass(frozen=True)
class Rigid:
    """A rigid transform of patient coordinates (LPS mm): ``matrix`` maps the prior scan's
    points to the current scan's."""

    matrix: np.ndarray  # 4 x 4

    def apply(self, point: Sequence[float]) -> tuple[float, float, float]:
        x, y, z = (float(v) for v in (self.matrix @ np.append(np.asarray(point, float), 1.0))[:3])
        return x, y, z

    @property
    def translation_mm(self) -> float:
        return float(np.linalg.norm(self.matrix[:3, 3]))

    @property
    def rotation_deg(self) -> float:
        """The angle of the rotation part, whatever its axis."""
        cosine = (float(np.trace(self.matrix[:3, :3])) - 1.0) / 2.0
        return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def study_datetime(ds: Dataset) -> datetime | None:
    """When a study was made: StudyDate (and StudyTime when given; PS3.3 C.7.2.1), or None
    when the date is missing or not a date."""
    date = str(ds.get("StudyDate") or "").strip()
    time = str(ds.get("StudyTime") or "").strip().split(".")[0]
    try:
        day = datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return None
    digits = (time + "000000")[:6] if time.isdigit() else "000000"
    try:
        return day.replace(hour=int(digits[:2]), minute=int(digits[2:4]), second=int(digits[4:]))
    except ValueError:
        return day


def interval_days(prior: Dataset, current: Dataset) -> float:
    """Days from the prior study to the current one (from their StudyDate and StudyTime)."""
    before, after = study_datetime(prior), study_datetime(current)
    if before is None or after is None:
        raise ValueError("a study without a valid StudyDate cannot be compared in time")
    days = (after - before).total_seconds() / 86400.0
    if days <= 0:
        raise ValueError("the prior study is not earlier than the current one")
    return days


def _simpleitk() -> Any:
    """SimpleITK, imported when registering (it is big) and typed as Any: its wrappers
    declare no types."""
    return importlib.import_module("SimpleITK")


def _coarse(volume: hd.Volume, spacing_mm: float) -> Any:
    """The volume as a SimpleITK image, clamped, smoothed and resampled isotropically."""
    sitk = _simpleitk()
    image = volume.to_simpleitk()
    image = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, *_CLAMP_HU)
    spacing = np.asarray(image.GetSpacing(), float)
    size = np.asarray(image.GetSize(), float)
    # Averaged over whole voxels first (fast, and no aliasing of noise and fine vessels), then
    # interpolated to the exact grid.
    factors = [max(1, int(spacing_mm // s)) for s in spacing]
    image = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    new_size = [max(4, round(n * s / spacing_mm)) for n, s in zip(size, spacing, strict=True)]
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        (spacing_mm,) * 3,
        image.GetDirection(),
        _CLAMP_HU[0],
        sitk.sitkFloat32,
    )


def register_rigid(
    current: hd.Volume,
    prior: hd.Volume,
    *,
    spacing_mm: float = REGISTRATION_SPACING_MM,
    seed: int = 1,
) -> Rigid:
    """The rigid transform that takes the prior scan onto the current one (patient LPS mm).

    Started from the alignment of the two bodies' centres of mass (the patient lay elsewhere on
    the table), then Mattes mutual information (32 bins, a fixed random sample, so the same
    scans give the same answer), regular-step gradient descent, two resolutions.
    """
    sitk = _simpleitk()
    fixed = _coarse(current, spacing_mm)
    moving = _coarse(prior, spacing_mm)
    # Air is 0 after the shift: the moments are those of the body, not of the field of view.
    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(fixed - _CLAMP_HU[0], sitk.sitkFloat32),
        sitk.Cast(moving - _CLAMP_HU[0], sitk.sitkFloat32),
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=300, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    # Coarse to fine: a whole chest is aligned well enough to match nodules at 12 and 6 mm
    # (seconds instead of tens of them); a small field of view needs the 3 mm grid itself.
    method.SetShrinkFactorsPerLevel([4, 2] if min(fixed.GetSize()) >= 32 else [2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    found = method.Execute(fixed, moving)
    # The transform maps current (fixed) points to prior (moving) ones; we want the reverse.
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0))
    forward = np.eye(4)
    forward[:3, :3] = np.asarray(euler.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(euler.GetCenter(), dtype=np.float64)
    translation = np.asarray(euler.GetTranslation(), dtype=np.float64)
    forward[:3, 3] = translation + center - forward[:3, :3] @ center
    return Rigid(np.linalg.inv(forward))


def match(
    current: Sequence[Lesion], prior: Sequence[Lesion], transform: Rigid
) -> list[tuple[int | None, int | None, float | None]]:
    """Pairs (current index, prior index, distance in mm after registration): the assignment
    of least total distance (Hungarian) among pairs closer than the larger of
    ``MIN_TOLERANCE_MM`` and either lesion's diameter; (i, None, None) for a current lesion
    with no prior (new), (None, j, None) for a prior lesion with none now (resolved)."""
    from scipy.optimize import linear_sum_assignment

    mapped = [transform.apply(p.center_lps_mm) for p in prior]
    pairs: list[tuple[int | None, int | None, float | None]] = []
    taken_current: set[int] = set()
    taken_prior: set[int] = set()
    if current and prior:
        distance = np.array(
            [[math.dist(c.center_lps_mm, m) for m in mapped] for c in current], dtype=float
        )
        tolerance = np.array(
            [[max(MIN_TOLERANCE_MM, c.diameter_mm, p.diameter_mm) for p in prior] for c in current]
        )
        cost = np.where(distance <= tolerance, distance, 1e9)
        for i, j in zip(*linear_sum_assignment(cost), strict=True):
            if distance[i, j] <= tolerance[i, j]:
                pairs.append((int(i), int(j), float(distance[i, j])))
                taken_current.add(int(i))
                taken_prior.add(int(j))
    pairs += [(i, None, None) for i in range(len(current)) if i not in taken_current]
    pairs += [(None, j, None) for j in range(len(prior)) if j not in taken_prior]
    return sorted(pairs, key=lambda p: (p[0] is None, p[0] or 0, p[1] or 0))


def doubling_time_days(prior_mm3: float, current_mm3: float, days: float) -> float | None:
    """Volume doubling time, Δt·ln 2 / ln(V2/V1) (Schwartz 1961), in days; negative when the
    lesion shrinks (its halving time), None when the volumes are equal or not positive."""
    if prior_mm3 <= 0 or current_mm3 <= 0 or current_mm3 == prior_mm3:
        return None
    return days * math.log(2.0) / math.log(current_mm3 / prior_mm3)


def compare(
    current: Sequence[Lesion],
    prior: Sequence[Lesion],
    transform: Rigid,
    days: float,
    *,
    stable_percent: float = STABLE_PERCENT,
) -> list[FindingChange]:
    """What became of each lesion: one change per current lesion (its index as ``finding``)
    and one per prior lesion no current one matches (resolved)."""
    changes = []
    for i, j, distance in match(current, prior, transform):
        before = prior[j] if j is not None else None
        now = current[i] if i is not None else None
        if before is None:
            assert now is not None
            changes.append(FindingChange(LesionStatus.NEW, i, volume_mm3=now.volume_mm3))
            continue
        if now is None:
            changes.append(
                FindingChange(
                    LesionStatus.RESOLVED,
                    None,
                    prior_center_lps_mm=before.center_lps_mm,
                    prior_diameter_mm=before.diameter_mm,
                    prior_volume_mm3=before.volume_mm3,
                )
            )
            continue
        percent = 100.0 * (now.volume_mm3 - before.volume_mm3) / before.volume_mm3
        status = (
            LesionStatus.INCREASED
            if percent > stable_percent
            else LesionStatus.DECREASED
            if percent < -stable_percent
            else LesionStatus.STABLE
        )
        changes.append(
            FindingChange(
                status,
                i,
                volume_mm3=now.volume_mm3,
                volume_change_percent=percent,
                # Within the stable margin the ratio is measurement noise, and so would be a
                # doubling time of thousands of days either way.
                doubling_time_days=None
                if status is LesionStatus.STABLE
                else doubling_time_days(before.volume_mm3, now.volume_mm3, days),
                distance_mm=distance,
                prior_center_lps_mm=before.center_lps_mm,
                prior_diameter_mm=before.diameter_mm,
                prior_volume_mm3=before.volume_mm3,
            )
        )
    return changes
