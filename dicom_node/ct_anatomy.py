"""Chest anatomy for CT phantoms: what a real chest CT shows besides nodules.

A nodule detector that has only seen two air-filled ellipses in a soft-tissue ellipse calls
vessels, bronchial walls, ribs and the spine of a real chest CT nodules. :class:`ChestAnatomy`
draws those (in patient LPS mm, so that the same chest can be sampled on any axial grid): a
body outline with a fat layer, lungs with a density gradient and texture, a heart and aorta, a
tree of pulmonary vessels (tubes narrowing from the hila), airways (a trachea and bronchi with
walls), ribs, a vertebral body with its canal and a sternum. Everything is seeded, so test and
training cases are drawn by choosing seeds.

:func:`slab_hu` images a slice of it as a scanner does: the mean over the slice's thickness
(partial volume) and a reconstruction kernel, soft (smooth, low noise) or sharp (edges
enhanced, noisy).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

KERNELS = ("soft", "sharp")

# HU of the tissues drawn
AIR, FAT, SOFT, BLOOD, MARROW, CORTEX = -1000.0, -100.0, 40.0, 40.0, 250.0, 700.0
LUNG = -860.0

# The chest's extent along z (mm): lung bases at 0, apices at LUNG_TOP_MM.
LUNG_TOP_MM = 240.0


@dataclass(frozen=True)
class Tubes:
    """Capsules: segment ``i`` from ``start[i]`` to ``end[i]`` (mm) with radius ``radius[i]``."""

    start: np.ndarray
    end: np.ndarray
    radius: np.ndarray

    @staticmethod
    def join(parts: list[tuple[np.ndarray, np.ndarray, float]]) -> Tubes:
        if not parts:
            return Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
        start, end, radius = zip(*parts, strict=True)
        return Tubes(np.array(start), np.array(end), np.array(radius, dtype=float))

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each capsule's box (low and high corners, mm): most are culled by it."""
        reach = self.radius[:, None]
        return (
            np.minimum(self.start, self.end) - reach,
            np.maximum(self.start, self.end) + reach,
        )

    def draw(
        self,
        hu: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        z: float,
        value: float,
        *,
        widen_mm: float = 0.0,
        where: np.ndarray | None = None,
    ) -> None:
        """Set ``value`` in ``hu`` (rows = ``y``, columns = ``x``, plane at ``z``) wherever a
        capsule, widened by ``widen_mm``, covers the pixel centre (and ``where`` allows)."""
        radius = self.radius + widen_mm
        low, high = self._bounds[0] - widen_mm, self._bounds[1] + widen_mm
        crossing = np.nonzero(
            (low[:, 2] <= z)
            & (high[:, 2] >= z)
            & (low[:, 0] <= x[-1])
            & (high[:, 0] >= x[0])
            & (low[:, 1] <= y[-1])
            & (high[:, 1] >= y[0])
        )[0]
        for i in crossing:
            c0, c1 = np.searchsorted(x, [low[i, 0], high[i, 0]])
            r0, r1 = np.searchsorted(y, [low[i, 1], high[i, 1]])
            if c1 <= c0 or r1 <= r0:
                continue
            px, py = x[None, c0:c1], y[r0:r1, None]
            a, d = self.start[i], self.end[i] - self.start[i]
            length2 = float(d @ d) or 1e-9
            t = np.clip(
                ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (z - a[2]) * d[2]) / length2, 0, 1
            )
            distance2 = (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2
            distance2 = distance2 + (z - a[2] - t * d[2]) ** 2
            inside = distance2 <= radius[i] ** 2
            if where is not None:
                inside &= where[r0:r1, c0:c1]
            hu[r0:r1, c0:c1][inside] = value


@dataclass(frozen=True)
class ChestAnatomy:
    """A seeded adult chest. ``offset_mm`` is where the grid's patient origin lies in this
    chest (so a small grid can look at any part of it); ``kernel`` is ``soft`` or ``sharp``.

    The chest's x runs to the patient's left, y posterior, z superior (LPS); its midline is
    x = 0, its lungs span z from 0 to :data:`LUNG_TOP_MM`.
    """

    seed: int = 0
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 120.0)
    kernel: str = "soft"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {self.kernel!r}")

    @cached_property
    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, 14])

    @cached_property
    def shape(self) -> dict[str, float]:
        rng = self._rng
        body_a, body_b = rng.uniform(140, 175), rng.uniform(95, 125)
        return {
            "body_a": body_a,
            "body_b": body_b,
            "fat": rng.uniform(6, 22),
            "muscle": rng.uniform(8, 14),
            "lung_x": body_a * rng.uniform(0.42, 0.48),
            "lung_y": rng.uniform(-8, 4),
            "lung_a": body_a * rng.uniform(0.3, 0.36),
            "lung_b": body_b * rng.uniform(0.66, 0.76),
            "heart_x": rng.uniform(10, 30),
            "heart_y": -body_b * rng.uniform(0.2, 0.35),
            "heart_a": rng.uniform(50, 65),
            "heart_b": rng.uniform(40, 55),
            "heart_top": rng.uniform(90, 130),
            "gradient": rng.uniform(30, 90),  # denser dependent (posterior) lung
            "texture": rng.uniform(10, 35),
        }

    def _outlines(self, x: np.ndarray, y: np.ndarray, z: float) -> dict[str, np.ndarray]:
        s = self.shape
        X, Y = x[None, :], y[:, None]
        body = (X / s["body_a"]) ** 2 + (Y / s["body_b"]) ** 2 <= 1
        inner = (X / (s["body_a"] - s["fat"])) ** 2 + (Y / (s["body_b"] - s["fat"])) ** 2 <= 1
        # the lungs narrow to their apices and stop at their bases
        scale = float(np.clip((LUNG_TOP_MM - z) / 60.0, 0, 1) ** 0.5) if z > 0 else 0.0
        lungs = np.zeros_like(body)
        if scale > 0:
            for side in (-1, 1):
                lungs |= ((X - side * s["lung_x"]) / (s["lung_a"] * scale)) ** 2 + (
                    (Y - s["lung_y"]) / (s["lung_b"] * scale)
                ) ** 2 <= 1
        heart = np.zeros_like(body)
        if z < s["heart_top"]:
            heart = ((X - s["heart_x"]) / s["heart_a"]) ** 2 + (
                (Y - s["heart_y"]) / s["heart_b"]
            ) ** 2 <= 1
        return {"body": body, "inner": inner, "lungs": lungs & ~heart & inner, "heart": heart}

    @cached_property
    def vessels(self) -> Tubes:
        """Pulmonary vessel trees: trunks from each hilum in every direction, branching and
        narrowing to under a millimetre, so that every slice cuts dozens of them."""
        rng, s = np.random.default_rng([self.seed, 15]), self.shape
        parts: list[tuple[np.ndarray, np.ndarray, float]] = []
        for side in (-1, 1):
            hilum = np.array([side * (s["lung_x"] - s["lung_a"] * 0.55), s["lung_y"], 140.0])
            stack = []
            for _ in range(int(rng.integers(7, 10))):
                direction = rng.normal(0, 1, 3) * [0.6, 0.6, 1.4] + [side * 0.5, 0, 0]
                stack.append((hilum + rng.normal(0, 8, 3), direction, rng.uniform(4.5, 7.0), 0))
            while stack:
                start, direction, radius, depth = stack.pop()
                direction = direction / np.linalg.norm(direction)
                length = min(radius * rng.uniform(6, 10), 45.0)
                bend = start
                for _ in range(3):  # a gently curving branch, three straight pieces
                    step = direction + rng.normal(0, 0.2, 3)
                    end = bend + step / np.linalg.norm(step) * length / 3
                    parts.append((bend, end, radius))
                    bend = end
                if radius > 1.0 and depth < 8:
                    for _ in range(2):
                        turn = direction + rng.normal(0, 0.55, 3)
                        stack.append((bend, turn, radius * rng.uniform(0.68, 0.8), depth + 1))
        return Tubes.join(parts)

    @cached_property
    def airways(self) -> Tubes:
        """The trachea and bronchi (lumen radius; the wall is drawn around it)."""
        rng, s = np.random.default_rng([self.seed, 16]), self.shape
        carina = np.array([0.0, s["lung_y"] - 5, 170.0])
        parts = [(np.array([0.0, s["lung_y"] - 15, 320.0]), carina, 8.0)]
        for side in (-1, 1):
            hilum = np.array([side * (s["lung_x"] - s["lung_a"] * 0.6), s["lung_y"], 155.0])
            parts.append((carina, hilum, 5.5))
            stack = [(hilum, np.array([side, 0.3, -0.3]) + rng.normal(0, 0.3, 3), 4.0, 0)]
            while stack:
                start, direction, radius, depth = stack.pop()
                end = start + direction / np.linalg.norm(direction) * radius * rng.uniform(6, 10)
                parts.append((start, end, radius))
                if radius > 1.0 and depth < 5:
                    for _ in range(2):
                        turn = direction + rng.normal(0, 0.7, 3)
                        stack.append((end, turn, radius * rng.uniform(0.65, 0.8), depth + 1))
        return Tubes.join(parts)

    @cached_property
    def ribs(self) -> Tubes:
        """Ribs: arcs from the spine around the chest wall, falling toward the front."""
        rng, s = np.random.default_rng([self.seed, 17]), self.shape
        parts = []
        a, b = s["body_a"] - s["fat"] - s["muscle"] * 0.5, s["body_b"] - s["fat"] - 6
        for level in np.arange(rng.uniform(-20, 0), LUNG_TOP_MM + 20, rng.uniform(22, 28)):
            radius = rng.uniform(3.5, 5.5)
            for side in (-1, 1):
                angles = np.linspace(0.45 * np.pi, -0.25 * np.pi * rng.uniform(0.6, 1.2), 10)
                drop = rng.uniform(70, 110)
                points = [
                    np.array([side * a * np.cos(t), b * np.sin(t), level - drop * (1 - t / np.pi)])
                    for t in angles
                ]
                parts += [(p, q, radius) for p, q in itertools.pairwise(points)]
        return Tubes.join(parts)

    def hu(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """The chest's HU on the plane ``z`` at the pixel centres ``x`` (columns) by ``y``
        (rows), grid coordinates (the offset is added here)."""
        ox, oy, oz = self.offset_mm
        x, y, z = x + ox, y + oy, z + oz
        s, outline = self.shape, self._outlines(x, y, z)
        hu = np.full(outline["body"].shape, AIR, dtype=np.float32)
        hu[outline["body"]] = FAT
        hu[outline["inner"]] = SOFT
        lungs = outline["lungs"]
        X, Y = x[None, :], y[:, None]
        rng = np.random.default_rng([self.seed, 18])
        texture = np.zeros(hu.shape, dtype=np.float32)
        for _ in range(4):  # smooth 3-D texture: a few plane waves of 15-40 mm
            k = rng.normal(0, 1, 3)
            k *= 2 * np.pi / rng.uniform(15, 40) / np.linalg.norm(k)
            texture += np.cos(k[0] * X + k[1] * Y + k[2] * z + rng.uniform(0, 2 * np.pi))
        lung = LUNG + s["gradient"] * (Y - s["lung_y"]) / s["lung_b"] + s["texture"] * texture / 2
        hu[lungs] = lung[lungs]
        # bones first where they sit in soft tissue, vessels and airways only in the lungs
        spine_y = s["body_b"] - s["fat"] - s["muscle"] - 28
        body = ((X / 17) ** 2 + ((Y - spine_y) / 15) ** 2) <= 1
        cortex = ((X / 19.5) ** 2 + ((Y - spine_y) / 17.5) ** 2) <= 1
        canal = (X / 7) ** 2 + ((Y - spine_y - 24) / 7) ** 2 <= 1
        arch = ((X / 14) ** 2 + ((Y - spine_y - 24) / 12) ** 2 <= 1) & ~canal
        hu[cortex | arch] = CORTEX
        hu[body] = MARROW
        hu[canal] = SOFT - 20
        sternum = (X / 12) ** 2 + ((Y + s["body_b"] - s["fat"] - 7) / 5) ** 2 <= 1
        if z > 60:
            hu[sternum] = MARROW
        aorta = (X - 22) ** 2 + (Y - spine_y + 8) ** 2 <= 12**2
        hu[aorta & ~lungs] = BLOOD
        self.ribs.draw(hu, x, y, z, CORTEX)
        self.ribs.draw(hu, x, y, z, MARROW, widen_mm=-1.5)
        self.vessels.draw(hu, x, y, z, BLOOD, where=lungs)
        self.airways.draw(hu, x, y, z, SOFT, widen_mm=1.2, where=lungs | outline["inner"])
        self.airways.draw(hu, x, y, z, AIR, where=lungs | outline["inner"])
        return hu


def slab_hu(
    anatomy: ChestAnatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    thickness_mm: float,
    paint: Callable[[np.ndarray, float], None] | None = None,
) -> np.ndarray:
    """A reconstructed axial slice of ``anatomy`` centred on ``z``: the mean over its
    thickness (partial volume of everything thinner than the slice), then the kernel's
    in-plane blur and edge enhancement. ``paint(hu, z)`` draws more (nodules) on each plane.
    Noise is the caller's: a sharp kernel shows more of it, and it is added after this.
    """
    planes = max(1, int(np.ceil(thickness_mm / 0.75)))
    total = np.zeros((y.size, x.size), dtype=np.float32)
    for j in range(planes):
        at = z + thickness_mm * ((j + 0.5) / planes - 0.5)
        hu = anatomy.hu(x, y, at)
        if paint is not None:
            paint(hu, at)
        total += hu
    total /= planes
    pixel_mm = [float(v[1] - v[0]) if v.size > 1 else 1.0 for v in (y, x)]
    if anatomy.kernel == "soft":
        smooth: np.ndarray = ndimage.gaussian_filter(total, [0.7 / p for p in pixel_mm])
        return smooth
    blurred: np.ndarray = ndimage.gaussian_filter(total, [1.2 / p for p in pixel_mm])
    sharp: np.ndarray = total + 0.6 * (total - blurred)  # a sharp (bone/lung) kernel's overshoot
    return sharp


def kernel_noise(
    rng: np.random.Generator, shape: tuple[int, int], noise_hu: float, kernel: str
) -> np.ndarray:
    """Quantum noise of standard deviation ``noise_hu`` as the kernel shapes it: a soft
    kernel correlates neighbouring pixels (blotchy), a sharp one leaves it fine-grained."""
    noise = rng.normal(0.0, 1.0, shape).astype(np.float32)
    if kernel == "soft":
        noise = ndimage.gaussian_filter(noise, 1.0)
        noise /= max(float(noise.std()), 1e-6)
    return noise * noise_hu
