"""What results copy from their sources, made valid before it is copied.

A SEG, an SR and a heat-map SC belong to their source's patient and study, so they copy its
Patient (PS3.3 C.7.1.1), General Study (C.7.2.1) and Patient Study (C.7.2.2) modules;
highdicom copies every root attribute of the source IOD's Patient and Study modules, reads
nine of them as attributes (``src.PatientID``: an AttributeError when the source lacks one),
and turns the General Equipment (C.7.5.1) attributes into a Contributing Equipment item; the
SC copies Body Part Examined and Laterality of the General Series (C.7.3.1) and the source's
Patient Orientation. Real sources break these modules often (a CR without Patient ID or
Study ID, a birth date sent as "1923-04-17", a Referenced Study Sequence item without its
Referenced SOP Class UID), and one such value would make every result of the study invalid
or unwritable.

So writers take :func:`copyable` copies of the sources, in which every copied attribute is
valid for its VR (PS3.5 6.2), its value multiplicity (PS3.6) and its module's rules, or else
left empty (Type 2) or left out (Type 1C, 3): a value is never guessed. What was changed is
logged by attribute keyword, never by value. The attributes a result cannot do without (the
UIDs that place it in the study and reference its sources) raise :class:`WriteError` instead.
The source files and the data sets the algorithms read are not touched.
"""

from __future__ import annotations

import logging
import re
import warnings
import weakref
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DA, DT, TM, validate_value

from dicom_node.errors import WriteError

if TYPE_CHECKING:  # highdicom's tables are read when first needed
    from dicom_node.compat.highdicom_tables import IodModule

log = logging.getLogger(__name__)


# The modules copied into results, besides those of the source IOD's Patient and Study
# information entities (Patient, General Study, Patient Study, Clinical Trial Subject and
# Study). General Equipment feeds Contributing Equipment; Specimen is copied into SEGs.
COPIED_MODULES = ("general-series", "general-equipment", "specimen", "frame-of-reference")
COPIED_IES = ("Patient", "Study")
# Image-level attributes a result takes from its source: the SC's Patient Orientation and Image
# Laterality (General Image), the Contributing Equipment item's acquisition time (General
# Acquisition).
COPIED_IMAGE_ATTRIBUTES = {
    "PatientOrientation": "2C",
    "ImageLaterality": "3",
    "AcquisitionDate": "3",
    "AcquisitionTime": "3",
    "AcquisitionDateTime": "3",
    # highdicom copies these into a SEG's Segmentation Image module (PS3.3 C.8.20.2)
    "LossyImageCompression": "1C",
    "LossyImageCompressionRatio": "3",
    "LossyImageCompressionMethod": "3",
    # highdicom reads a SEG's source's Slice Thickness (Image Plane, Type 2) as an attribute
    "SliceThickness": "2",
}
# highdicom reads these from the source as attributes, whatever their module says they are:
# absent, they are given as empty values (all are Type 2 in the results' modules).
READ_AS_ATTRIBUTES = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "SliceThickness",
)
# Without these a result cannot be placed in its study or reference its source.
NEEDED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
# Enumerated values (PS3.3) of copied attributes: validators check them, and highdicom refuses
# a Patient's Sex outside them.
ENUMERATED = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "AnatomicalOrientationType": frozenset({"BIPED", "QUADRUPED"}),
    "LossyImageCompression": frozenset({"00", "01"}),
}
# PS3.3 C.7.6.1.1.1: each value names the patient directions of the rows or columns, the most
# dominant first (biped letters; a quadruped's terms are longer and also upper case).
_ORIENTATION = re.compile(r"^[APRLHF]{1,3}$|^(?:CR|CD|R|M|L|D|V|PA|DI|PR|RO|LE|A|P|H|F)+$")
_VM = re.compile(r"^(\d+)(?:-(\d*)n|-(\d+))?$")  # 1, 2, 1-n, 2-2n, 1-3 (PS3.6)

# keyword -> (its Type, the rules of the attributes of its items): what a module copies.
Rules = dict[str, tuple[str, "Rules"]]
# (tag, VR, value) -> why the value may not be copied, or None: verdicts kept for a series.
Memo = dict[tuple[BaseTag, str, bytes | str], str | None]


def copyable(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The source instances as the writers may copy them (see the module's docstring): each a
    shallow copy whose copied attributes are valid, empty or absent, or the instance itself
    when nothing needed changing. Raises :class:`WriteError` naming a UID the results need.
    """
    changes: dict[str, set[str]] = {}
    memo: Memo = {}
    out = []
    for ds in datasets:
        unusable = unusable_uids(ds)
        if unusable:
            raise WriteError(
                f"the source's {unusable[0]}: the results could not be placed in its study "
                "or reference it"
            )
        edits = _edits(ds, memo)
        if edits:
            copy = Dataset(dict(ds.items()))  # its own element dictionary, the elements shared
            if hasattr(ds, "file_meta"):
                copy.file_meta = ds.file_meta
            for keyword, (action, why) in edits.items():
                tag = Tag(keyword)
                if action == "dropped":
                    del copy[tag]
                else:
                    vr = dictionary_VR(tag).split(" or ")[0]
                    copy[tag] = DataElement(tag, vr, DicomSequence() if vr == "SQ" else "")
                changes.setdefault(f"{why}, {action}", set()).add(keyword)
            ds = copy
        out.append(ds)
    if changes and not _reported_before(datasets):
        log.warning(
            "the source's copied attributes (PS3.3 C.7.1.1, C.7.2, C.7.3.1, C.7.5.1) are "
            "corrected in the results: %s",
            "; ".join(f"{what}: {', '.join(sorted(k))}" for what, k in sorted(changes.items())),
        )
    return out


# The first instance of each series whose corrections were logged, while it is in use: the
# SEG, the SR and the SC of one job copy the same instances, and say so once.
_REPORTED: weakref.WeakValueDictionary[int, Dataset] = weakref.WeakValueDictionary()


def _reported_before(datasets: Sequence[Dataset]) -> bool:
    first = datasets[0]
    if _REPORTED.get(id(first)) is first:
        return True
    _REPORTED[id(first)] = first
    return False


def unusable_uids(ds: Dataset) -> list[str]:
    """ "StudyInstanceUID is absent" (or empty, or invalid) for each of :data:`NEEDED_UIDS`
    that ``ds`` lacks or holds as no valid UID (PS3.5 9.1)."""
    found = []
    for keyword in NEEDED_UIDS:
        element = _get(ds, keyword)
        if element is None or _is_empty(element):
            found.append(f"{keyword} is {'absent' if element is None else 'empty'}")
        elif _problem(element, {}) is not None:
            found.append(f"{keyword} is not a valid UID")
    return found


def _edits(ds: Dataset, memo: Memo) -> dict[str, tuple[str, str]]:
    """keyword -> (what the copy does: "written empty" or "dropped", why) for ``ds``."""
    sop_class_uid = str(ds.get("SOPClassUID", ""))
    edits = _attribute_edits(ds, sop_class_uid, memo)
    # A module the IOD does not require is copied whole or not at all: without its Type 1
    # attributes (a Clinical Trial Subject module holding only a site name), what remains
    # would tell validators that the module is there and incomplete.
    tags = ds.keys()
    present = {keyword_for_tag(tag) for tag in tags}
    for keywords, required in optional_modules(sop_class_uid):
        kept = [k for k in keywords if k in present and edits.get(k, ("",))[0] != "dropped"]
        if kept and not all(k in kept for k in required):
            for keyword in kept:
                edits[keyword] = ("dropped", "its module incomplete")
    return edits


@cache
def optional_modules(sop_class_uid: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(root keywords, Type 1 root keywords) of each copied module the IOD makes optional."""
    from dicom_node.compat.highdicom_tables import iod_modules, module_attributes, sop_class_iods

    iod = sop_class_iods().get(sop_class_uid)
    attributes = module_attributes()
    out = []
    for module in iod_modules()[iod] if iod else []:
        if module["usage"] == "M" or not _copied_module(module):
            continue
        root = [a for a in attributes[module["key"]] if not a["path"]]
        out.append(
            (
                tuple(a["keyword"] for a in root),
                tuple(a["keyword"] for a in root if a["type"] == "1"),
            )
        )
    return out


def _copied_module(module: IodModule) -> bool:
    return module["ie"] in COPIED_IES or module["key"] in COPIED_MODULES


def _attribute_edits(ds: Dataset, sop_class_uid: str, memo: Memo) -> dict[str, tuple[str, str]]:
    """The edits of the copied attributes ``ds`` holds, and of those highdicom reads that it
    lacks. ``memo`` keeps the verdict on each value seen: the instances of a series mostly
    share their patient, study and series values, so each is checked once per series."""
    table = copied_by_tag(sop_class_uid)
    edits: dict[str, tuple[str, str]] = {}
    present = ds.keys()  # tags, without converting the raw elements
    for keyword in READ_AS_ATTRIBUTES:
        if Tag(keyword) not in present and Tag(keyword) in table:
            edits[keyword] = ("written empty", "absent")
    for tag in present:
        if tag not in table:
            continue
        keyword, kind, nested = table[tag]
        raw = ds.get_item(tag)
        key = (
            None
            if raw.VR == "SQ"
            else (tag, raw.VR, raw.value if isinstance(raw.value, bytes) else repr(raw.value))
        )
        if key is not None and key in memo:
            problem = memo[key]
        else:
            element = _get(ds, keyword)
            problem = _problem(element, nested)  # type: ignore[arg-type]
            if problem is None and _is_empty(element) and kind != "2":  # type: ignore[arg-type]
                # Empty is valid for Type 3, but an empty sequence breaks its item count and
                # an empty value may make validators take a condition as met (an empty Strain
                # Description says the patient is an animal): nothing is lost leaving it out.
                problem = "empty"
            if key is not None:
                memo[key] = problem
        if problem is not None:
            action = "written empty" if kind == "2" or keyword in READ_AS_ATTRIBUTES else "dropped"
            edits[keyword] = (action, problem)
    return edits


@cache
def copied_by_tag(sop_class_uid: str) -> dict[BaseTag, tuple[str, str, Rules]]:
    """tag -> (keyword, Type, nested rules) of :func:`copied_attributes`, but the UIDs the
    results need (checked on their own)."""
    return {
        Tag(keyword): (keyword, kind, nested)
        for keyword, (kind, nested) in copied_attributes(sop_class_uid).items()
        if keyword not in NEEDED_UIDS
    }


def _get(ds: Dataset, keyword: str) -> DataElement | None:
    try:
        return ds[keyword]
    except KeyError:
        return None
    except Exception:  # a raw element pydicom cannot even convert: as bad as invalid
        return DataElement(Tag(keyword), "UN", b"\xff")


@cache
def copied_attributes(sop_class_uid: str) -> Rules:
    """keyword -> (its Type, {nested keyword: (Type, ...)}) of every root attribute a result
    copies from an instance of ``sop_class_uid``, from highdicom's tables of the standard."""
    from dicom_node.compat.highdicom_tables import iod_modules, module_attributes, sop_class_iods

    iod = sop_class_iods().get(sop_class_uid)
    modules = [m["key"] for m in (iod_modules()[iod] if iod else []) if _copied_module(m)]
    if not iod:  # an IOD highdicom does not know: the modules every image IOD has
        modules = ["patient", "general-study", "patient-study", *COPIED_MODULES]
    attributes = module_attributes()
    table: Rules = {}
    for module in modules:
        for item in attributes[module]:
            node: Rules = table
            for step in item["path"]:
                node = node.setdefault(step, ("3", {}))[1]
            # An attribute of two modules keeps the Type it has in the first.
            kind, below = node.get(item["keyword"], (item["type"], {}))
            node[item["keyword"]] = (kind, below)
    modules_of_iod = iod_modules().get(iod, []) if iod else []
    in_iod = {a["keyword"] for m in modules_of_iod for a in attributes[m["key"]]}
    for keyword, kind in COPIED_IMAGE_ATTRIBUTES.items():
        if keyword in in_iod or not iod:
            table.setdefault(keyword, (kind, {}))
    return table


def _is_empty(element: DataElement) -> bool:
    value = element.value
    return value is None or (not isinstance(value, int | float) and len(value) == 0)


def _problem(element: DataElement, nested: Rules) -> str | None:
    """Why ``element`` may not be copied as it is ("invalid", "an invalid item"), or None."""
    keyword = keyword_for_tag(element.tag)
    try:
        expected = dictionary_VR(element.tag).split(" or ")
    except KeyError:
        return None  # not a standard attribute: not copied by any module
    if element.VR not in expected:
        return f"of VR {element.VR}, not {expected[0]}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote the value
            if element.VR == "SQ":
                return (
                    None
                    if all(_valid_item(i, nested) for i in element.value)
                    else ("an invalid item")
                )
            if _is_empty(element):
                return None
            return None if _valid_values(keyword, element) else "invalid"
    except Exception:  # a value pydicom cannot convert is invalid whatever the reason
        return "invalid"


def _values(element: DataElement) -> list[Any]:
    value = element.value
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _valid_values(keyword: str, element: DataElement) -> bool:
    vr = element.VR
    values = _values(element)
    if not _multiplicity(dictionary_VM(element.tag), len(values)):
        return False
    for value in values:
        if vr in ("DS", "IS"):  # as sent, not as pydicom's number prints
            text = str(getattr(value, "original_string", None) or value)
        elif vr in ("DA", "TM", "DT", "PN"):
            text = str(value)
        else:
            text = value
        validate_value(vr, text, config.RAISE)
        if vr in ("DA", "TM", "DT") and text and {"DA": DA, "TM": TM, "DT": DT}[vr](text) is None:
            return False
        if vr == "PN" and not _valid_name(text):
            return False
        if keyword in ENUMERATED and text not in ENUMERATED[keyword]:
            return False
        if keyword == "PatientOrientation" and not _ORIENTATION.match(str(text)):
            return False
    return True


def _multiplicity(vm: str, count: int) -> bool:
    match = _VM.match(vm)
    if match is None:
        return True  # a form the dictionary does not use for the copied attributes
    low = int(match.group(1))
    if match.group(3):
        return low <= count <= int(match.group(3))
    if match.group(2) is not None:  # "1-n", "2-2n": at least low, a multiple of the step
        step = int(match.group(2) or 1)
        return count >= low and count % step == 0
    return count == low


def _valid_name(text: str) -> bool:
    """PS3.5 6.2.1: at most three component groups of at most five components each."""
    groups = text.split("=")
    return len(groups) <= 3 and all(len(g.split("^")) <= 5 for g in groups)


def _valid_item(item: Dataset, rules: Rules) -> bool:
    """An item holds its Type 1 (non-empty) and Type 2 attributes, and every value in it is
    valid; conditional attributes are checked when present."""
    for keyword, (kind, _) in rules.items():
        element = _get(item, keyword)
        if kind in ("1", "2") and element is None:
            return False
        if kind == "1" and element is not None and _is_empty(element):
            return False
    for element in item:
        if element.tag.is_private:
            continue
        keyword = keyword_for_tag(element.tag)
        below = rules.get(keyword, ("3", {}))[1]
        if _problem(element, below) is not None:
            return False
    return True
