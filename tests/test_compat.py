"""dicom_node.compat: each library workaround still does what its module says.

The pynetdicom server's defences are exercised end to end by test_hostile_network.py (bounded
PDUs, silent peers) and test_security.py (TLS handshakes); these are the in-process checks.
"""

from __future__ import annotations

import pytest
from highdicom import _standard_utils
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, SegmentationStorage

pytestmark = pytest.mark.unit


def test_highdicom_iod_lookup_is_memoised_once_and_answers_as_highdicom() -> None:
    import dicom_node.write  # noqa: F401  (memoises at import)
    from dicom_node.compat.highdicom_iod import memoise_iod_lookups

    memoised = _standard_utils.is_attribute_in_iod
    original = memoised.__wrapped__
    memoise_iod_lookups()
    assert _standard_utils.is_attribute_in_iod is memoised  # not wrapped twice
    cases = [
        ("Rows", CTImageStorage, None),
        ("NumberOfFrames", CTImageStorage, None),
        ("NumberOfFrames", EnhancedCTImageStorage, None),
        ("NumberOfFrames", EnhancedCTImageStorage, ["SharedFunctionalGroupsSequence"]),
        ("PixelData", SegmentationStorage, ("IconImageSequence",)),
    ]
    for attribute, sop_class, excluded in cases:
        expected = original(attribute, sop_class, excluded)
        assert memoised(attribute, sop_class, excluded) is expected
        assert memoised(attribute, sop_class, excluded) is expected  # from the memo
    assert _standard_utils.does_iod_have_pixel_data(SegmentationStorage)


def test_dicom_node_send_streams_files_from_disk() -> None:
    from pynetdicom import _config

    import dicom_node.scu  # noqa: F401  (sets the switch at import)

    assert _config.STORE_SEND_CHUNKED_DATASET is True


def test_highdicom_tables_have_the_shape_their_types_say() -> None:
    from dicom_node.compat.highdicom_tables import (
        anatomic_regions,
        iod_modules,
        module_attributes,
        sop_class_iods,
    )

    iod = sop_class_iods()[CTImageStorage]
    modules = iod_modules()[iod]
    assert {"patient", "general-study", "ct-image"} <= {m["key"] for m in modules}
    for module in modules:
        assert set(module) == {"key", "usage", "ie"}
        assert module["usage"] in ("M", "C", "U")
        for attribute in module_attributes()[module["key"]]:
            assert set(attribute) == {"keyword", "type", "path"}
            assert isinstance(attribute["path"], list)
    chest, paired = anatomic_regions()["CHEST"]
    assert (chest.scheme_designator, chest.meaning, paired) == ("SCT", "Chest", False)
    assert anatomic_regions()["BREAST"][1] is True
