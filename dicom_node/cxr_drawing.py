"""Two independently drawn chest radiograph phantoms, as brightness images (air dark).

Used by :mod:`dicom_node.phantoms` (which encodes them as DICOM) to train and to test the demo
pneumonia model. They are built differently on purpose, so that a model trained on one and
tested on the other is tested off its training distribution:

- :func:`draw_ellipses` (the demo's training generator) paints the image directly: an
  elliptical body and lungs, a heart shadow, ribs and clavicles as bright arcs, vessels as
  random walks from the hila, an opacity as a sum of Gaussian blobs or a thresholded noise
  patch.
- :func:`draw_projection` computes the image as an X-ray would: tissue, air and bone
  thickness in millimetres along each ray (torso with shoulders and arms, lungs bounded by
  the diaphragm domes and the heart, ribs with cortical rims, a vascular tree that branches),
  attenuated exponentially, then processed like a vendor's (log, unsharp mask, tone curve).
  Its consolidation replaces lung air by fluid in a lobe-shaped or round patch with air
  bronchograms.

Both vary the field of view, collimation, markers and wires, blur, noise and the tone curve
with the seed, and return the opacity's centre (row, column) or None. Nothing here is
anatomy-accurate: it is enough for a demo to learn that consolidation is not ribs or vessels.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Centre = tuple[float, float] | None


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.3:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = _blur(rng.normal(0.0, 1.0, shape).astype(np.float32), sigma_px)
    return field / max(float(field.std()), 1e-6)


def _polyline(canvas: np.ndarray, points: np.ndarray, thickness: float, value: float = 1.0) -> None:
    """Draw an open polyline (x, y pixel points) of ``thickness`` pixels onto ``canvas``."""
    cv2.polylines(
        canvas,
        [np.round(points).astype(np.int32).reshape(-1, 1, 2)],
        False,
        value,
        max(1, round(thickness)),
        lineType=cv2.LINE_AA,
    )


def _extras(rng: np.random.Generator, image: np.ndarray, fill: float) -> np.ndarray:
    """What real radiographs carry whatever the finding: a side marker, wires, collimation.

    ``fill`` is the brightness of the collimated (unexposed) border.
    """
    rows, columns = image.shape
    size = min(rows, columns)
    if rng.random() < 0.6:  # a lead side marker in a corner
        scale = size / 400 * rng.uniform(0.6, 1.4)
        x = int(rng.uniform(0.05, 0.8) * columns)
        y = int(rng.choice([rng.uniform(0.08, 0.2), rng.uniform(0.8, 0.95)]) * rows)
        # OpenCV draws text on 8-bit images only: draw a mask, then blend it in.
        mask = np.zeros(image.shape, dtype=np.uint8)
        cv2.putText(
            mask,
            str(rng.choice(["L", "R", "PA", "AP"])),
            (x, y),
            int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX])),
            scale,
            255,
            max(1, round(2 * scale)),
            cv2.LINE_AA,
        )
        image = np.maximum(image, mask.astype(np.float32) / 255 * rng.uniform(0.85, 1.0))
    for _ in range(rng.integers(0, 4) if rng.random() < 0.4 else 0):  # leads, lines, wires
        start = rng.uniform(0.1, 0.9, 2) * (columns, rows)
        bend = rng.normal(0, 0.25, 2) * size
        end = rng.uniform(0.1, 0.9, 2) * (columns, rows)
        t = np.linspace(0, 1, 40)[:, None]
        points = (1 - t) ** 2 * start + 2 * t * (1 - t) * (start + end) / 2 + bend * t * (1 - t)
        points = points + t**2 * end
        _polyline(image, points, size * rng.uniform(0.002, 0.006), float(rng.uniform(0.7, 1.0)))
    if rng.random() < 0.5:  # collimator shutters
        top, bottom = (int(rng.uniform(0, 0.08) * rows) for _ in range(2))
        left, right = (int(rng.uniform(0, 0.08) * columns) for _ in range(2))
        image[:top] = fill
        image[rows - bottom :] = fill
        image[:, :left] = fill
        image[:, columns - right :] = fill
    return image


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Detector blur and noise, then clip to [0, 1]."""
    size = min(image.shape)
    image = _blur(image, rng.uniform(0, 1.5) * size / 512)
    image = image + rng.normal(0, rng.uniform(0.004, 0.03), image.shape).astype(np.float32)
    clipped: np.ndarray = np.clip(image, 0.0, 1.0)
    return clipped


def draw_ellipses(
    rng: np.random.Generator, rows: int, columns: int, opacity: bool
) -> tuple[np.ndarray, Centre]:
    """The training phantom: painted brightness in [0, 1] and the opacity centre or None."""
    scale = rng.uniform(0.8, 1.2)
    shift = rng.uniform(-0.06, 0.06, 2)

    def to_px(u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
        """Anatomy coordinates (u across, v down, the chest in [0, 1]) to (x, y) pixels."""
        return np.stack(
            [
                ((u - 0.5) * scale + 0.5 + shift[0]) * columns,
                ((v - 0.5) * scale + 0.5 + shift[1]) * rows,
            ],
            axis=-1,
        )

    yy, xx = np.mgrid[:rows, :columns].astype(np.float32)
    x = (xx / columns - 0.5 - shift[0]) / scale + 0.5
    y = (yy / rows - 0.5 - shift[1]) / scale + 0.5
    size = min(rows, columns) * scale
    image = np.full((rows, columns), rng.uniform(0.02, 0.1), dtype=np.float32)
    body = ((x - 0.5) / rng.uniform(0.4, 0.47)) ** 2 + ((y - 0.58) / 0.52) ** 2 <= 1
    tissue = rng.uniform(0.5, 0.65)
    image[body] = tissue + 0.12 * (1 - np.abs(x[body] - 0.5) / 0.47)
    lungs, lung_shapes = np.zeros_like(image), []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.16, 0.22)
        cy = rng.uniform(0.44, 0.5)
        rx, ry = rng.uniform(0.11, 0.16), rng.uniform(0.24, 0.32)
        r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        # Darkest in the middle of each lung, where the ray crosses the most air.
        lungs = np.maximum(lungs, np.sqrt(np.clip(1 - r2, 0, 1)))
        lung_shapes.append((cx, cy, rx, ry))
    inside = lungs > 0
    image -= rng.uniform(0.3, 0.45) * np.minimum(lungs * rng.uniform(1.2, 2.5), 1) * body
    heart = ((x - 0.5 - rng.uniform(0.03, 0.09)) / rng.uniform(0.1, 0.16)) ** 2 + (
        (y - rng.uniform(0.6, 0.66)) / rng.uniform(0.09, 0.13)
    ) ** 2 <= 1
    image[heart & body] = np.maximum(image[heart & body], tissue * rng.uniform(0.8, 1.0))
    image[body & (np.abs(x - 0.5) < rng.uniform(0.03, 0.05))] += 0.15  # spine, mediastinum
    # Ribs (posterior arcs rising from the spine, anterior ones falling to it) and clavicles.
    bones = np.zeros_like(image)
    t = np.linspace(0, 1, 50)
    ribs = rng.integers(8, 12)
    for side in (-1, 1):
        for k in range(ribs):
            v0 = 0.18 + k * rng.uniform(0.055, 0.065)
            u = 0.5 + side * (0.03 + 0.38 * t)
            v = v0 - 0.05 * np.sin(np.pi * 0.9 * t) + 0.06 * t**2
            _polyline(bones, to_px(u, v), size * rng.uniform(0.012, 0.02), 1.0)
            u = 0.5 + side * (0.4 - 0.3 * t)
            v = v0 + 0.06 + 0.09 * t
            _polyline(bones, to_px(u, v), size * 0.012, 0.5)
        u = 0.5 + side * (0.05 + 0.28 * t)
        v = rng.uniform(0.15, 0.2) - 0.05 * t + 0.02 * np.sin(2 * np.pi * t)
        _polyline(bones, to_px(u, v), size * rng.uniform(0.02, 0.03), 1.0)
    image += rng.uniform(0.06, 0.14) * _blur(bones, size / 400) * body
    # Vessels: random walks from each hilum, thinning outwards.
    vessels = np.zeros_like(image)
    for side in (-1, 1):
        for _ in range(rng.integers(6, 14)):
            point = np.array([0.5 + side * rng.uniform(0.06, 0.1), rng.uniform(0.4, 0.5)])
            angle = np.arctan2(rng.uniform(-1, 1), side * rng.uniform(0.2, 1))
            width = size * rng.uniform(0.006, 0.012)
            for _ in range(rng.integers(4, 9)):
                angle += rng.normal(0, 0.35)
                step = point + rng.uniform(0.02, 0.045) * np.array([np.cos(angle), np.sin(angle)])
                _polyline(vessels, to_px(*np.stack([point, step], axis=1)), width, 1.0)
                point, width = step, max(1.0, width * 0.75)
    image += rng.uniform(0.05, 0.12) * _blur(vessels, size / 300) * (lungs > 0)
    centre: Centre = None
    if opacity:
        cx, cy, rx, ry = lung_shapes[rng.integers(2)]
        oy = cy + rng.uniform(-0.4, 0.5) * ry
        ox = cx + rng.uniform(-0.45, 0.45) * rx
        radius = rng.uniform(0.07, 0.14)
        kind = rng.integers(3)
        if kind == 0:  # one soft blob
            patch = np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * radius**2))
        elif kind == 1:  # a cluster of small blobs
            patch = np.zeros_like(image)
            for _ in range(rng.integers(3, 9)):
                bx, by = ox + rng.normal(0, radius), oy + rng.normal(0, radius)
                r = radius * rng.uniform(0.3, 0.6)
                patch = np.maximum(patch, np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * r**2)))
        else:  # a patch of thresholded noise inside a soft ellipse
            envelope = np.exp(-(((x - ox) / (1.3 * radius)) ** 2 + ((y - oy) / radius) ** 2))
            texture = _smooth_noise(rng, image.shape, size * radius * 0.25)
            patch = envelope * np.clip(0.6 + 0.5 * texture, 0, 1)
        strength = rng.uniform(0.3, 0.5)
        image += strength * patch * _blur(inside.astype(np.float32), size / 100)
        centre = (float(to_px(ox, oy)[1]), float(to_px(ox, oy)[0]))
    image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    image = _extras(rng, image, float(rng.choice([0.0, rng.uniform(0.85, 1.0)])))
    return _finish(rng, image), centre


def _lung_mask(
    xx: np.ndarray,
    yy: np.ndarray,
    side: int,
    half_width: np.ndarray,
    base: float,
    dome: float,
    apex: float,
    medial: float,
) -> np.ndarray:
    """One lung (``side`` -1 is the patient's right, image left) on the mm grid."""
    lateral = side * xx
    inner = lateral > medial
    outer = lateral < half_width - 14
    # The diaphragm dome, highest at mid-lung; the costophrenic angle is its lateral end.
    mid = (medial + half_width) / 2
    floor = base - dome * (1 - ((lateral - mid) / ((half_width - medial) / 2 + 1e-3)) ** 2)
    below_apex = yy > apex + 0.012 * (lateral - mid) ** 2
    return inner & outer & (yy < floor) & below_apex


def _vessel_tree(
    rng: np.random.Generator,
    canvas: np.ndarray,
    start: np.ndarray,
    angle: float,
    length: float,
    width: float,
    depth: int,
    to_px: Callable[[np.ndarray], np.ndarray],
) -> None:
    """A binary branching tree: each branch forks in two, thinner and shorter."""
    if depth == 0 or width < 0.6:
        return
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    _polyline(canvas, to_px(np.stack([start, end])), width, 1.0)
    for turn in (-1, 1):
        _vessel_tree(
            rng,
            canvas,
            end,
            angle + turn * rng.uniform(0.2, 0.6),
            length * rng.uniform(0.6, 0.85),
            width * 0.7,
            depth - 1,
            to_px,
        )


def draw_projection(
    rng: np.random.Generator, rows: int, columns: int, opacity: bool
) -> tuple[np.ndarray, Centre]:
    """The held-out phantom: attenuation along rays, processed; brightness in [0, 1]."""
    fov = rng.uniform(340, 470)  # mm across the detector
    mm = fov / max(rows, columns)
    angle = np.deg2rad(rng.uniform(-5, 5))
    offset = rng.normal(0, 12, 2)
    lift = rng.uniform(120, 170)  # mm from the image centre up to the lung apices
    yy, xx = np.mgrid[:rows, :columns].astype(np.float32)
    # Patient mm: X towards the patient's left (image right), Y down from the lung apices.
    px, py = (xx - columns / 2) * mm, (yy - rows / 2) * mm
    cos, sin = np.cos(angle), np.sin(angle)
    xx = cos * px - sin * py - offset[0]
    yy = sin * px + cos * py + lift - offset[1]

    def to_px(points: np.ndarray) -> np.ndarray:
        """Patient mm (X, Y) points to (x, y) pixels: the mapping above, inverted."""
        a, b = points[..., 0] + offset[0], points[..., 1] - lift + offset[1]
        return np.stack(
            [(cos * a + sin * b) / mm + columns / 2, (-sin * a + cos * b) / mm + rows / 2],
            axis=-1,
        )

    # Torso: half-width grows from the neck to the shoulders, then stays; depth ~ 90-120 mm.
    chest = rng.uniform(140, 175)
    shoulder = np.clip((yy + 40) / 50, 0, 1)
    half_width = 55 + (chest + 20 - 55) * shoulder - 20 * np.clip((yy - 40) / 200, 0, 1)
    depth = rng.uniform(90, 125)
    tissue = 2 * depth * np.sqrt(np.clip(1 - (xx / half_width) ** 2, 0, 1))
    for side in (-1, 1):  # arms beside the chest, sometimes raised out of the field
        if rng.random() < 0.6:
            arm_x = side * (chest + rng.uniform(35, 60))
            radius = rng.uniform(35, 50)
            arm = 2 * np.sqrt(np.clip(radius**2 - (xx - arm_x) ** 2, 0, None)) * (yy > -10)
            tissue = np.maximum(tissue, arm)
    # Lungs: air thickness grows with distance from the lung border.
    base = rng.uniform(230, 290)
    air = np.zeros_like(tissue)
    lung_any = np.zeros(tissue.shape, dtype=bool)
    for side in (-1, 1):
        lung = _lung_mask(
            xx,
            yy,
            side,
            half_width,
            base + (12 if side == 1 else 0) + rng.normal(0, 6),
            rng.uniform(25, 45),
            rng.uniform(-5, 10),
            rng.uniform(18, 30),
        )
        distance = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 5) * mm
        air = np.maximum(air, 2 * depth * 0.85 * (1 - np.exp(-distance / rng.uniform(25, 45))))
        lung_any |= lung
    # Heart and aortic knob replace air with blood where they overlap the lungs.
    heart = ((xx - rng.uniform(15, 35)) / rng.uniform(60, 85)) ** 2 + (
        (yy - base + rng.uniform(45, 65)) / rng.uniform(45, 60)
    ) ** 2
    air *= np.clip((heart - 0.9) / rng.uniform(0.1, 0.4), 0, 1)
    air *= np.hypot(xx - 28, yy - rng.uniform(55, 75)) > rng.uniform(14, 20)
    # Bone: spine with vertebrae, ribs with bright cortices, clavicles, breast shadows as tissue.
    bone = np.zeros_like(tissue)
    spine = (np.abs(xx) < 20) & (yy > -60)
    bone += spine * (8 + 5 * (np.sin(yy / rng.uniform(22, 28) * 2 * np.pi) > -0.7))
    ribs = np.zeros_like(tissue)
    s = np.linspace(0, 1, 60)
    first = rng.uniform(5, 20)
    gap = rng.uniform(20, 26)
    for side in (-1, 1):
        for k in range(11):
            y0 = first + k * gap
            points = np.stack(
                [side * (18 + (chest - 10) * s), y0 - 14 * np.sin(np.pi * 0.75 * s) + 40 * s**2],
                axis=-1,
            )
            _polyline(ribs, to_px(points), rng.uniform(9, 13) / mm, 1.0)
            points = np.stack([side * (chest - 15) * (1 - 0.7 * s), y0 + 35 + 45 * s], axis=-1)
            _polyline(ribs, to_px(points), 9 / mm, 0.5)
        points = np.stack([side * (15 + 125 * s), -8 - 20 * s + 6 * np.sin(2 * np.pi * s)], axis=-1)
        _polyline(ribs, to_px(points), rng.uniform(11, 16) / mm, 1.2)
    cortex = ribs - cv2.erode(ribs, np.ones((3, 3), np.uint8), iterations=max(1, round(1.5 / mm)))
    bone += rng.uniform(2, 4) * ribs + rng.uniform(1.5, 3) * cortex
    if rng.random() < 0.35:
        for side in (-1, 1):
            breast = ((xx - side * 90) / 75) ** 2 + ((yy - base + 30) / 50) ** 2
            tissue += 40 * np.sqrt(np.clip(1 - breast, 0, 1))
    # Vessels: a branching tree from each hilum, within the lungs.
    vessels = np.zeros_like(tissue)
    for side in (-1, 1):
        hilum = np.array([side * rng.uniform(35, 50), base * rng.uniform(0.45, 0.55)])
        for direction in rng.uniform(-2.4, 2.4, rng.integers(3, 6)):
            heading = np.pi / 2 - side * (np.pi / 2 - abs(direction)) * np.sign(direction + 1e-6)
            _vessel_tree(rng, vessels, hilum, heading, rng.uniform(25, 40), 6 / mm, 5, to_px)
    tissue_air = air * (1 - rng.uniform(0.1, 0.25) * _blur(vessels, 1.5 / mm) * lung_any)
    centre: Centre = None
    if opacity:
        fill = np.zeros_like(tissue)
        candidates = np.argwhere(lung_any & (air > 0.5 * air.max()))
        seed_row, seed_col = candidates[rng.integers(len(candidates))]
        sx, sy = xx[seed_row, seed_col], yy[seed_row, seed_col]
        if rng.random() < 0.5:  # lobar: the part of the lung beyond an oblique fissure
            slope = rng.uniform(-0.6, 0.6)
            lobe = (yy - sy - slope * (xx - sx)) * rng.choice([-1, 1]) < rng.uniform(10, 40)
            lobe &= np.hypot(xx - sx, yy - sy) < rng.uniform(50, 90)
            region = lobe & lung_any & (np.sign(xx) == np.sign(sx))
        else:  # round pneumonia with a ragged border
            theta = np.arctan2(yy - sy, xx - sx)
            radius = rng.uniform(20, 45) * (1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)))
            region = (np.hypot(xx - sx, yy - sy) < radius) & lung_any
        texture = _smooth_noise(rng, tissue.shape, 6 / mm)
        fill = np.clip(rng.uniform(0.5, 0.9) + 0.25 * texture, 0, 1) * region
        bronchi = np.zeros_like(tissue)
        _vessel_tree(rng, bronchi, np.array([sx, sy]), rng.uniform(0, 6.3), 18, 3 / mm, 3, to_px)
        fill = _blur(fill * (1 - 0.6 * bronchi), 3 / mm)
        tissue_air = tissue_air * (1 - fill)
        rr, cc = np.nonzero(fill > 0.3)
        if not len(rr):  # a sliver of lung: the seed point is the best centre there is
            rr, cc = np.array([seed_row]), np.array([seed_col])
        centre = (float(rr.mean()), float(cc.mean()))
    # Attenuation (1/mm): soft tissue 0.02, bone many times more; the log image is linear in it.
    attenuation = 0.02 * np.clip(tissue - tissue_air, 0, None) + 0.05 * bone * (tissue > 0)
    intensity = np.exp(-attenuation)
    photons = rng.uniform(2e3, 2e4)
    intensity = rng.poisson(intensity * photons).astype(np.float32) / photons
    log_image = -np.log(np.clip(intensity, 1 / photons, None))
    log_image = _blur(log_image, rng.uniform(0.2, 0.6) / mm)
    # Vendor processing: percentile normalisation, unsharp mask, a sigmoid tone curve.
    low, high = np.percentile(log_image, [1, 99.5])
    image = (log_image - low) / max(high - low, 1e-6)
    image += rng.uniform(0, 0.8) * (image - _blur(image, 15 / mm))
    image = 1 / (1 + np.exp(-rng.uniform(2.5, 5) * (image - rng.uniform(0.35, 0.55))))
    image = image.astype(np.float32)
    image = _extras(rng, image, float(rng.choice([0.0, 1.0])))
    return _finish(rng, image), centre
