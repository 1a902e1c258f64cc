"""What every writer takes from the source series: its instances in the order of its volume,
its character set, and the algorithm's concepts as DICOM codes."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_node.algorithm import Concept, SeriesInput
from dicom_node.copied import copyable
from dicom_node.errors import WriteError

_DEFINED_CHARACTER_SETS = frozenset(v.value for v in hd.SpecificCharacterSetValues)


def character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set for an object that copies its patient's names.

    highdicom refuses two valid forms (PS3.3 C.12.1.1.2), so they are given in the form it
    takes, meaning the same: an empty value 1 with code extensions, as Japanese sites send
    ``\\ISO 2022 IR 87``, is the default repertoire, ISO 2022 IR 6; a single-byte term with
    code extensions used alone needs no escape sequence and is its term without them, and
    ISO_IR 6 (not a defined term, often sent) is the default repertoire. Another term the
    standard does not define is refused: the names could not be encoded for sure.
    """
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    terms = [str(v).strip() for v in ([value] if isinstance(value, str) else value)]
    if len(terms) > 1 and terms[0] == "":
        terms[0] = "ISO 2022 IR 6"
    elif len(terms) == 1:
        if terms[0] in ("ISO 2022 IR 6", "ISO_IR 6"):  # the default repertoire, said aloud
            return None
        plain = terms[0].replace("ISO 2022 IR ", "ISO_IR ")
        if plain in _DEFINED_CHARACTER_SETS:
            terms = [plain]
    undefined = [t for t in terms if t not in _DEFINED_CHARACTER_SETS]
    if undefined:
        raise WriteError(
            f"the source's SpecificCharacterSet {undefined[0]!r} is not a defined term "
            "(PS3.3 C.12.1.1.2): the patient's names cannot be written for sure"
        )
    return terms[0] if len(terms) == 1 else terms


def code(concept: Concept) -> Code:
    return Code(concept.value, concept.scheme, concept.meaning)


def spatially_ordered(series: SeriesInput) -> tuple[hd.Volume, list[Dataset]]:
    """The series' volume and its instances in the volume's frame order.

    Each instance is located by mapping its ImagePositionPatient into the volume's indices:
    it must land on frame ``k``'s first voxel, (k, 0, 0), or the volume and the instances
    disagree (rows or columns flipped, frames missing) and nothing is written.
    """
    volume = series.volume()
    datasets = copyable(series.datasets())
    if len(datasets) == 1:
        return volume, datasets  # one instance: a multi-frame image or a single slice
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    indices = volume.map_reference_to_indices(positions)
    frames = np.rint(indices[:, 0]).astype(int)
    if not np.allclose(indices, np.stack([frames, 0 * frames, 0 * frames], axis=1), atol=1e-3):
        raise WriteError(f"series {series.series_uid}: instances do not tile its volume")
    if sorted(frames.tolist()) != list(range(volume.spatial_shape[0])):
        raise WriteError(f"series {series.series_uid}: instances and volume frames differ")
    return volume, [datasets[i] for i in np.argsort(frames)]
