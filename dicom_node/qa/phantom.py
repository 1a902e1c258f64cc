"""The phantom studies qa sends: each installed algorithm's own self-test (its
:class:`~dicom_node.algorithm.QaCase`), written to disk, with the truth it was made with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.algorithm import QaCase, QaPhantom
from dicom_node.plugins import Registration

__all__ = ["Phantom", "self_tests"]


def self_tests(registry: Mapping[str, Registration]) -> dict[str, QaCase]:
    """The QA cases the installed algorithms declare, by name in name order; an algorithm that
    declares none (or whose plugin does not load) has no self-test."""
    return {
        name: registration.algorithm.qa_case
        for name, registration in sorted(registry.items())
        if registration.algorithm is not None and registration.algorithm.qa_case is not None
    }


@dataclass
class Phantom:
    """A phantom study on disk for one algorithm: what its QA case wrote, and the headers of
    the files (read once, on demand)."""

    algorithm: str
    case: QaCase
    truth: QaPhantom
    _headers: dict[str, list[Dataset]] = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, algorithm: str, case: QaCase, folder: Path) -> Phantom:
        """Write the algorithm's phantom study into ``folder/<algorithm>``."""
        return cls(algorithm, case, case.make(folder / algorithm))

    @property
    def label(self) -> str:
        return self.case.label

    @property
    def kinds(self) -> frozenset[str]:
        """The result objects the algorithm writes: SEG, SR, SC."""
        return self.case.results

    @property
    def series(self) -> Mapping[str, tuple[Path, ...]]:
        """Role -> files, in the order they were written."""
        return self.truth.series

    @property
    def primary(self) -> str:
        """The role whose grid the truth's masks are on (a SEG's source)."""
        return self.truth.primary

    def headers(self, role: str) -> list[Dataset]:
        if role not in self._headers:
            self._headers[role] = [dcmread(p, stop_before_pixels=True) for p in self.series[role]]
        return self._headers[role]

    @property
    def paths(self) -> list[Path]:
        return [p for paths in self.series.values() for p in paths]

    def uids(self, role: str) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.headers(role)]

    def series_uids(self) -> dict[str, str]:
        return {role: str(self.headers(role)[0].SeriesInstanceUID) for role in self.series}

    @property
    def first(self) -> Dataset:
        return self.headers(self.primary)[0]
