"""highdicom's lookup of an attribute in an IOD, memoised.

What upstream does (highdicom 0.28, ``highdicom._standard_utils``): ``is_attribute_in_iod``
walks the standard's module tables (PS3.3) from the start on every call. Its callers in the same
module, ``does_iod_have_pixel_data`` and ``is_multiframe_image``, run once per referenced image
while a SEG or SR is built (``SourceImageForSegmentation``, ``SourceImageForRegion`` and the
like): about 3 ms each, 1.6 s of the 2 s a four-sequence MR SEG took for its 620 references.
The answer depends only on the attribute, the SOP class and the excluded path elements, so
:func:`memoise_iod_lookups` memoises it where those callers look it up (the module's global).
highdicom's modules that imported the function by name keep calling the original.

Upstream issue: none found for this lookup (searched highdicom's tracker for
``is_attribute_in_iod``, ``does_iod_have_pixel_data`` and slow SEG construction). Related,
other costs of building a SEG: https://github.com/ImagingDataCommons/highdicom/pull/227
("Improve Segmentation Creation Efficiency", merged).

Remove when highdicom caches these lookups itself (then the function finds nothing to do and
goes with this module). Only :mod:`dicom_node.write` calls it, once at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from highdicom import _standard_utils

# (attribute keyword, SOP class UID, excluded path elements)
_Key = tuple[str, str, tuple[str, ...] | None]
_Lookup = Callable[[str, str, Sequence[str] | None], bool]


def memoise_iod_lookups() -> None:
    """Replace ``highdicom._standard_utils.is_attribute_in_iod`` by a memoised wrapper of
    itself; a second call leaves the wrapper as it is."""
    lookup: _Lookup = _standard_utils.is_attribute_in_iod
    if hasattr(lookup, "__wrapped__"):  # memoised already (functools.wraps below)
        return
    answers: dict[_Key, bool] = {}

    @functools.wraps(lookup)
    def memoised(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        key = (
            attribute,
            sop_class_uid,
            None if exclude_path_elements is None else tuple(exclude_path_elements),
        )
        if key not in answers:
            answers[key] = lookup(attribute, sop_class_uid, exclude_path_elements)
        return answers[key]

    _standard_utils.is_attribute_in_iod = memoised
