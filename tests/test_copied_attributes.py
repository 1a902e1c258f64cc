"""Any source the node routes gets valid results, whatever its patient, study, series,
equipment and image attributes hold: an exhaustive property over every root attribute of the
source IOD's modules (highdicom's tables of PS3.3 A and C), each deleted, empty and invalid
for its VR (issue 14, item 2).

For each case the source is changed on disk as a modality would have sent it, the algorithm's
part is done as the algorithms do it (the CT's volume, the radiograph's displayed image), and
the writers make a SEG and an SR from the CT and a heat-map SC from the CR. Then either every
object passes dciodvfy with no error, or the job failed at once with an InputError or
WriteError that names the attribute, and only for an attribute the algorithm or the results
need (:data:`NEEDED`: geometry, pixel description, the UIDs that place the results).

The attributes of the Patient, General Study, Patient Study, General Series and General
Equipment modules, and those the algorithms need, are changed one at a time; the other image
attributes module by module, and a module whose case fails is tried attribute by attribute so
that the failure names its attribute. The run stays short: the sources are tiny, the cases
run on two processes, and objects that are the same but for their own UIDs and creation
times (most cases change nothing the results copy) are validated once; the fingerprint keeps
every date, time and UID's validity, so an invalid value is never folded into a valid one.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from highdicom._standard_utils import (
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage

from dicom_node.algorithm import (
    AlgorithmResult,
    Classification,
    Concept,
    Finding,
    HeatMap,
    InputError,
    LabelMask,
    SeriesInput,
    Weights,
)
from dicom_node.copied import _problem
from dicom_node.display import displayed_image
from dicom_node.errors import WriteError
from dicom_node.phantoms import CtPhantomSpec, CxrPhantomSpec, cxr_dataset, write_ct_series
from dicom_node.write import Provenance, heat_map_capture, measurement_report, segmentation
from tests.support.peers import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODULE = Concept("SCT", "27925004", "Nodule")
PROVENANCE = Provenance("property", "1.0", Weights(None, None, demo=False))
# The five modules the issue names: copied into every result.
COPIED = ("patient", "general-study", "patient-study", "general-series", "general-equipment")
# What the algorithms or the results cannot do without: a case may fail on these, naming them.
NEEDED = {
    # the results' place in the study and their references to the source
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    # the geometry of a volume (PS3.3 C.7.6.2) and its frame of reference
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "FrameOfReferenceUID",
    # the pixel description (PS3.3 C.7.6.3) and what turns stored values into HU or display
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "PixelData",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "ModalityLUTSequence",
    "ExtendedOffsetTable",
    "RealWorldValueMappingSequence",
    "ICCProfile",
    "ExtendedOffsetTableLengths",
    # the character repertoire the patient's names are written in (PS3.3 C.12.1.1.2)
    "SpecificCharacterSet",
}
SOURCES = {"CT": CTImageStorage, "CR": ComputedRadiographyImageStorage}
MUTATIONS = ("deleted", "empty", "invalid")


def root_attributes(sop_class_uid: str) -> dict[str, list[str]]:
    """module -> its root attribute keywords, for every module of the IOD (PS3.3 A)."""
    attributes = get_module_attribute_map()
    iod = get_sop_class_iod_map()[sop_class_uid]
    return {
        m["key"]: [a["keyword"] for a in attributes[m["key"]] if not a["path"]]
        for m in get_iod_module_map()[iod]
    }


def _nested(keyword: str) -> list[tuple[str, str]]:
    """(keyword, Type) of the attributes of ``keyword``'s items, from any module."""
    return [
        (a["keyword"], a["type"])
        for items in get_module_attribute_map().values()
        for a in items
        if a["path"] == [keyword]
    ]


# An invalid value for each VR (PS3.5 6.2): too long, wrong characters, wrong form.
INVALID_TEXT = {
    "AE": "X" * 17,
    "AS": "62",
    "CS": "not-a-term",
    "DA": "1923-04-17",
    "DS": "1.23456789012345678",  # 19 characters
    "DT": "2026-11-24 12:00",
    "IS": "1.5",
    "LO": "x" * 65,
    "LT": "x" * 10241,
    "PN": "a^b^c^d^e^f",
    "SH": "x" * 17,
    "ST": "x" * 1025,
    "TM": "12:30:00",
    "UI": "1.2.abc",
    "UR": " no spaces",
}
BINARY = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8, "UV": 8}


def unchecked(tag: int, vr: str, value: str) -> DataElement:
    """An element holding ``value`` as given, past pydicom's validation on assignment."""
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        return DataElement(tag, vr, value)
    finally:
        pydicom_config.settings.writing_validation_mode = previous


def mutate(ds: Dataset, keyword: str, mutation: str) -> bool:
    """Change ``ds``'s ``keyword`` as a careless sender would; False when it cannot be."""
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag).split(" or ")[0]
    if mutation == "deleted":
        if tag not in ds:
            return False  # the phantom lacks it already: the same as an untouched source
        del ds[tag]
        return True
    if mutation == "empty":
        value = [] if vr == "SQ" else (None if vr in BINARY or vr.startswith("O") else "")
        ds[tag] = DataElement(tag, vr, value)
        return True
    if vr == "SQ":
        # An item that lacks its Type 1 attributes, or holds one invalid value.
        item = Dataset()
        for nested, kind in _nested(keyword):
            nested_vr = dictionary_VR(tag_for_keyword(nested)).split(" or ")[0]
            if nested_vr in INVALID_TEXT and kind != "1":
                item[nested] = unchecked(
                    tag_for_keyword(nested), nested_vr, INVALID_TEXT[nested_vr]
                )
                break
        ds[tag] = DataElement(tag, "SQ", [item])
        return True
    if vr in INVALID_TEXT:
        ds[tag] = unchecked(tag, vr, INVALID_TEXT[vr])
        return True
    if vr in BINARY:  # a length that is no whole number of values
        length = BINARY[vr] + 1
        raw = RawDataElement(Tag(tag), vr, length, b"\x01" * length, 0, False, True)
        ds._dict[Tag(tag)] = raw
        return True
    return False  # OB, OW, UN, UC, UT: any value is valid


@dataclass
class Outcome:
    objects: list[Path]
    refused: str | None = None


def run_case(
    folder: Path, source: str, keywords: tuple[str, ...], mutation: str, paths: list[Path]
) -> Outcome | None:
    """Write the mutated source into ``folder``, do the algorithm's part and write the
    results; None when no keyword can be mutated so (deleting what the source lacks)."""
    datasets = [dcmread(p) for p in paths]
    changed = [mutate(ds, k, mutation) for k in keywords for ds in datasets]
    if not any(changed):
        return None
    folder.mkdir(parents=True)
    mutated = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, ds in enumerate(datasets):
            path = folder / f"source-{index}.dcm"
            ds.save_as(path, enforce_file_format=False)
            mutated.append(path)
    series = SeriesInput("1", tuple(mutated))
    inputs = {"series": series}
    try:
        if source == "CT":
            volume = series.volume()
            mask = np.zeros(volume.spatial_shape, bool)
            mask[1:3, 4:9, 4:9] = True
            centre = volume.map_indices_to_reference(np.array([[2.0, 6.0, 6.0]]))[0]
            result = AlgorithmResult(
                "property",
                "1.0",
                demo=False,
                masks=[LabelMask("Nodule 1", mask, property_type=NODULE)],
                findings=[Finding("Nodule", tuple(centre), (5.0, 5.0, 5.0), 0.9, mask="Nodule 1")],
                looked_for=[NODULE],
            )
            seg = segmentation(result, inputs, PROVENANCE, series_number=901)
            sr = measurement_report(result, inputs, PROVENANCE, series_number=902, segmentation=seg)
            written = {"seg": seg, "sr": sr}
        else:
            (dataset,) = series.datasets()
            image = displayed_image(dataset)
            result = AlgorithmResult(
                "property",
                "1.0",
                demo=False,
                classifications=[Classification("Pneumonia", 0.7, 0.5)],
                heatmaps=[HeatMap("cam", np.linspace(0, 1, image.size).reshape(image.shape))],
            )
            written = {"sc": heat_map_capture(result, inputs, PROVENANCE, series_number=903)}
    except (InputError, WriteError) as exc:
        return Outcome([], refused=str(exc))
    out = []
    for name, dataset in written.items():
        path = folder / f"{name}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        out.append(path)
    return Outcome(out)


def fingerprint(path: Path) -> str:
    """The object but for what differs between two writes of the same result: its UIDs,
    creation dates and times and its pixels (replaced by whether each is valid and empty)."""
    ds = dcmread(path)
    lines = []
    for element in ds.iterall():
        if element.VR in ("UI", "DA", "TM", "DT") or element.tag == 0x7FE00010:
            value = f"{_problem(element, {}) is None}:{element.is_empty}"
        elif element.VR == "SQ":
            value = str(len(element.value))
        else:
            value = repr(element.value)
        lines.append(f"{element.tag}{element.VR}{value}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dciodvfy_errors(path: Path) -> list[str]:
    report = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    return [line[:160] for line in (report.stdout + report.stderr).splitlines() if "Error" in line]


@dataclass
class Checked:
    failures: list[str]
    counts: dict[str, int]
    logged: list[str]


def check(folder: Path, source: str, group: tuple[str, ...], mutation: str, paths) -> Checked:
    """One case: a group of keywords mutated together; when it fails, each keyword alone, so
    that a failure names its attribute. Runs in a worker process."""
    done = Checked([], {"results": 0, "refused": 0, "unchanged": 0, "validated": 0}, [])
    seen: set[str] = set()
    handler = _Collect()
    logging.getLogger("dicom_node").addHandler(handler)
    try:
        _check(folder, source, group, mutation, paths, done, seen)
    finally:
        logging.getLogger("dicom_node").removeHandler(handler)
    done.logged = handler.messages
    return done


def _check(folder, source, group, mutation, paths, done: Checked, seen: set[str]) -> bool:
    case = f"{source} {'+'.join(group) if len(group) < 4 else group[0] + '...'} {mutation}"
    problem = None
    try:
        outcome = run_case(folder, source, group, mutation, paths)
    except Exception as exc:  # every failure is reported, with its case
        outcome, problem = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    if outcome is None and problem is None:
        done.counts["unchanged"] += 1
        return True
    if outcome is not None and outcome.refused is not None:
        done.counts["refused"] += 1
        if not any(k in NEEDED and k in outcome.refused for k in group):
            problem = f"refused: {outcome.refused[:200]}"
    elif outcome is not None:
        done.counts["results"] += 1
        for path in outcome.objects:
            key = fingerprint(path)
            if key in seen:
                continue
            seen.add(key)
            done.counts["validated"] += 1
            errors = dciodvfy_errors(path)
            if errors:
                problem = f"{path.name}: {errors[:3]}"
                break
    if problem is None:
        return True
    if len(group) == 1:
        done.failures.append(f"{case}: {problem}")
        return False
    for index, keyword in enumerate(group):  # name the attributes that fail alone
        _check(folder / f"{index}", source, (keyword,), mutation, paths, done, seen)
    if len(done.failures) == 0:
        done.failures.append(f"{case}: fails together only: {problem}")
    return False


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def groups(sop_class_uid: str) -> list[tuple[str, ...]]:
    """The cases' keywords: each attribute of the five copied modules alone, each attribute
    the algorithms need alone, the other image attributes module by module."""
    modules = root_attributes(sop_class_uid)
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for module in [*COPIED, *(m for m in modules if m not in COPIED)]:
        keywords = [
            k for k in modules.get(module, []) if k not in seen and tag_for_keyword(k) is not None
        ]
        seen.update(keywords)
        if module in COPIED:
            out.extend((k,) for k in keywords)
        else:
            out.extend((k,) for k in keywords if k in NEEDED)
            rest = tuple(k for k in keywords if k not in NEEDED)
            if rest:
                out.append(rest)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("sources")
    spec = CtPhantomSpec(slices=4, rows=16, columns=16, pixel_spacing_mm=(0.8, 0.8))
    cr = cxr_dataset(CxrPhantomSpec(rows=48, columns=40))
    cr_path = folder / "cr.dcm"
    cr.save_as(cr_path, enforce_file_format=True)
    return {"CT": write_ct_series(folder / "ct", spec), "CR": [cr_path]}


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_gets_valid_results_or_a_reason_naming_what_it_lacks(
    tmp_path, sources, source
) -> None:
    require_tool("dciodvfy")
    cases = [
        (tmp_path / f"{mutation}-{number}", source, group, mutation, sources[source])
        for mutation in MUTATIONS
        for number, group in enumerate(groups(SOURCES[source]))
    ]
    with ProcessPoolExecutor(2) as pool:
        checked = list(pool.map(check, *zip(*cases, strict=True)))
    failures = [f for c in checked for f in c.failures]
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures)
    counts = {k: sum(c.counts[k] for c in checked) for k in checked[0].counts}
    # Every attribute was tried, most gave results, and the results were not all the same.
    assert counts["results"] > len(cases) // 2 and counts["validated"] > 20, counts
    # The log names what was corrected, never the values that were sent.
    logged = "\n".join(m for c in checked for m in c.logged)
    assert "PatientBirthDate" in logged and "ReferencedStudySequence" in logged
    assert not any(v in logged for v in ("1923-04-17", "a^b^c^d^e^f", "not-a-term", "1.2.abc"))
