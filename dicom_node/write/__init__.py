"""Write algorithm results as DICOM, one module per object kind as highdicom is laid out:
:mod:`~dicom_node.write.seg` (Segmentation), :mod:`~dicom_node.write.sr` (TID 1500
Measurement Report), :mod:`~dicom_node.write.sc` (heat-map Secondary Capture), with what they
share in :mod:`~dicom_node.write.provenance` (who made a result) and
:mod:`~dicom_node.write.source` (what is taken from the source series).

Algorithms return plain data; this stage turns it into standard objects in the source's study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.algorithm import AlgorithmResult, SeriesInput
from dicom_node.compat.highdicom_iod import memoise_iod_lookups
from dicom_node.config import ResultsConfig
from dicom_node.errors import WriteError
from dicom_node.write.provenance import Provenance, result_series_number
from dicom_node.write.sc import heat_map_capture
from dicom_node.write.seg import segmentation
from dicom_node.write.sr import measurement_report

__all__ = [
    "Provenance",
    "WriteError",
    "Written",
    "heat_map_capture",
    "measurement_report",
    "result_series_number",
    "segmentation",
    "write_all",
]


# highdicom rescans the standard's tables for every referenced image; see the module.
memoise_iod_lookups()


@dataclass(frozen=True)
class Written:
    """One DICOM object written for a result."""

    kind: str  # SEG, SR or SC
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str


def write_all(
    result: AlgorithmResult,
    inputs: dict[str, SeriesInput],
    provenance: Provenance,
    folder: Path,
    numbers: ResultsConfig,
) -> list[Written]:
    """Every object ``result`` calls for, written into ``folder``: a SEG when there are
    masks, an SR when there is anything to report (a statement of absence included), a
    heat-map SC per heat map. The SEG's source is the input the masks are on; the other
    inputs (an MR study's other sequences) are its further sources. Each result's series is
    numbered and described after its source series (:func:`result_series_number`,
    :meth:`Provenance.series_description`), so the results of two series of one study can
    be told apart."""
    primary = result.masks[0].source if result.masks else next(iter(inputs))
    source = inputs[primary].datasets()[0]
    objects: list[tuple[str, Dataset]] = []
    seg = None
    if result.masks:
        # A prior study compared with is not a source of the masks: they are drawn on this one.
        prior = result.followup.prior if result.followup is not None else None
        further = [name for name in inputs if name not in (primary, prior)]
        seg = segmentation(
            result,
            inputs,
            provenance,
            series_number=result_series_number(source, "SEG", numbers.seg_series_number),
            further_sources=further,
            omit_empty_frames=numbers.seg_omit_empty_frames,
        )
        objects.append(("SEG", seg))
    if result.findings or result.masks or result.classifications or result.looked_for:
        sr = measurement_report(
            result,
            inputs,
            provenance,
            series_number=result_series_number(source, "SR", numbers.sr_series_number),
            segmentation=seg,
            source=primary,
        )
        objects.append(("SR", sr))
    if result.heatmaps:
        reference = inputs[result.heatmaps[0].source].datasets()[0]
        number = result_series_number(reference, "SC", numbers.sc_series_number)
        sc = heat_map_capture(result, inputs, provenance, series_number=number)
        objects.append(("SC", sc))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, dataset in objects:
        path = folder / f"{kind.lower()}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append(
            Written(
                kind,
                path,
                str(dataset.SOPClassUID),
                str(dataset.SOPInstanceUID),
                str(dataset.SeriesInstanceUID),
                str(dataset.StudyInstanceUID),
            )
        )
    return written
