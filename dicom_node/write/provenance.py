"""Who made a result, as every written object says it: the algorithm, its version and its
weights (PS3.3 C.8.20.2 Algorithm Identification), the DEMO warning, and the series number and
description that tie a result to its source series."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.algorithm import DEMO_WARNING, Weights

MANUFACTURER = "dicom-node"
MODEL_NAME = "dicom-node"


@dataclass(frozen=True)
class Provenance:
    """Who made a result: the algorithm, its version and its weights."""

    algorithm: str
    version: str
    weights: Weights
    description: str = "AI {algorithm} {kind}"  # results.series_description

    @property
    def weights_kind(self) -> str:
        """DEMO (ours, trained on phantoms), none (image processing), or the user's own."""
        if self.weights.demo:
            return "DEMO"
        return "none" if self.weights.path is None else "public"

    @property
    def weights_label(self) -> str | None:
        """The SR's algorithm parameter: DEMO, none, or the public weights' SHA-256 (None for
        public weights made without one)."""
        return self.weights.sha256 if self.weights_kind == "public" else self.weights_kind

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification (PS3.3 C.8.20.2) with the weights' SHA-256 as a parameter."""
        parameters = {"weights": self.weights_kind}
        if self.weights.sha256:
            parameters["weights_sha256"] = self.weights.sha256
        return hd.AlgorithmIdentificationSequence(
            name=self.algorithm,
            family=codes.DCM.ArtificialIntelligence,
            version=self.version,
            source=MANUFACTURER,
            parameters=parameters,
        )

    def series_description(self, kind: str, source: Dataset | None = None) -> str:
        """E.g. "AI lung-nodules-ct SEG: Thorax 1.0 B70f": the configured text, then the
        source series' description, so that the results of two reconstructions of one study
        can be told apart in a PACS list. With demo weights the DEMO warning comes first
        (whatever the configured text). At most 64 characters (LO, PS3.5 6.2).

        When the source's description would keep fewer than :data:`SOURCE_CHARACTERS` of its
        characters, the algorithm's name is left out of the text (it is in every result's
        Algorithm Identification) rather than the source's description cut short.
        """
        prefix = f"{DEMO_WARNING} " if self.weights.demo else ""
        label = self.description.format(algorithm=self.algorithm, kind=kind)
        of = str(source.get("SeriesDescription") or "").strip() if source is not None else ""
        if not of:
            return (prefix + label)[:64]
        if len(prefix) + len(label) + 2 + min(len(of), SOURCE_CHARACTERS) > 64:
            label = " ".join(self.description.format(algorithm="", kind=kind).split())
        return (prefix + (f"{label}: {of}" if label else of))[:64]


# How much of the source series' description a result's description keeps at least.
SOURCE_CHARACTERS = 24
# The last two digits of a result's Series Number: which kind of result it is.
RESULT_SUFFIX = {"SEG": 1, "SR": 2, "SC": 3}
_LARGEST_IS = 2**31 - 1  # PS3.5 6.2: IS is a signed 32-bit integer


def result_series_number(source: Dataset, kind: str, configured: int) -> int:
    """The Series Number of ``kind``'s result of the source series: the source's number
    followed by two digits, 01 for the SEG, 02 for the SR, 03 for the SC (series 3 gives
    301, 302, 303; series 12 gives 1201 ...).

    A reader sees which series a result belongs to from its number alone, the results of
    two reconstructions of one study differ, and each result sorts after the acquisitions of
    a usual study (numbered below 100); it is how Philips scanners number the series they
    derive. The configured number is used when the source has no usable Series Number
    (Type 2, so it may be empty) or one that the suffix would take past the largest IS.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warning quotes the value
        try:
            number = int(source.get("SeriesNumber"))
        except (TypeError, ValueError):
            return configured
    if number < 1 or number * 100 + 99 > _LARGEST_IS:
        return configured
    return number * 100 + RESULT_SUFFIX[kind]
