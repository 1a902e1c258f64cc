"""highdicom's tables of the standard, read through this one module.

What upstream does (highdicom 0.28): highdicom ships tables generated from the standard, the IOD
of each SOP class, the modules of each IOD (with their usage and information entity) and the
attributes of each module (with their Type and sequence path) of PS3.3, and the anatomic regions
of PS3.16 Annex L with whether each is paired. It reads them through ``highdicom._standard_utils``,
a private module: none of it is public API, and the functions return loosely typed lists.

dicom-node reads them for which source attributes a result copies and which of their values are
valid to copy (:mod:`dicom_node.copied`), and for whether a body part is paired
(:mod:`dicom_node.write.sc`). This module gives them their shape as types.

Upstream issue: none found asking for these tables as public API (searched highdicom's tracker).

Remove when highdicom, or pydicom, publishes the tables: their callers then read them from there.
A highdicom release that moves or reshapes them breaks this module alone.
"""

from __future__ import annotations

from typing import TypedDict, cast

from highdicom import _standard_utils
from highdicom.sr import CodedConcept

__all__ = [
    "IodModule",
    "ModuleAttribute",
    "anatomic_regions",
    "iod_modules",
    "module_attributes",
    "sop_class_iods",
]


class IodModule(TypedDict):
    """A module of an IOD (PS3.3 A.1.3): its key, usage (M, C or U) and information entity."""

    key: str
    usage: str
    ie: str


class ModuleAttribute(TypedDict):
    """An attribute of a module (PS3.3 C): its keyword, Type and the sequences it is nested in."""

    keyword: str
    type: str
    path: list[str]


def sop_class_iods() -> dict[str, str]:
    """SOP class UID -> the key of its IOD (``"ct-image"``)."""
    return _standard_utils.get_sop_class_iod_map()


def iod_modules() -> dict[str, list[IodModule]]:
    """IOD key -> its modules."""
    return cast(dict[str, list[IodModule]], _standard_utils.get_iod_module_map())


def module_attributes() -> dict[str, list[ModuleAttribute]]:
    """Module key -> its attributes, nested ones included (their ``path`` not empty)."""
    return cast(dict[str, list[ModuleAttribute]], _standard_utils.get_module_attribute_map())


def anatomic_regions() -> dict[str, tuple[CodedConcept, bool]]:
    """Body Part Examined term -> (its anatomic region code, whether it is paired)."""
    return _standard_utils.get_anatomic_region_map()
