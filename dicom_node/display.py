"""What a reader sees of an image: shared by algorithms (their input) and writers (overlays)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut


def displayed_image(ds: Dataset) -> np.ndarray:
    """The radiograph as a reader sees it: air dark, whatever the photometric interpretation."""
    pixels = ds.pixel_array
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        pixels = pixels.mean(axis=-1)  # an RGB capture of a radiograph
    elif pixels.ndim != 2:
        raise ValueError(f"expected one 2-D radiograph, got pixel data of shape {pixels.shape}")
    image = apply_modality_lut(pixels.astype(np.float32), ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        image = apply_voi_lut(image, ds)
    image = np.asarray(image, dtype=np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = image.max() - image
    return image
