"""Finding a patient's prior study on the node, for an algorithm that follows lesions up.

An algorithm declares that it wants a prior (:class:`~dicom_node.algorithm.PriorSpec`); when
it is routed, :func:`find_prior` looks among the studies the node holds — received, or
retrieved from a PACS, which is the same thing once stored — for the most recent earlier study
of the same patient within the declared age that has a series the routing rule would have
chosen for the algorithm's input. What it found, or why nothing, goes into the routing
decision; the series, when there is one, into the job's inputs under the prior's role.

The index keeps no patient identifiers, so each other study's identity is read from the
header of one of its stored instances (PatientID, Issuer of Patient ID, StudyDate, StudyTime:
a few hundred bytes each). Nothing here is logged: the reasons name days and series numbers,
never a patient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread

from dicom_node.algorithm import PriorSpec
from dicom_node.database import Database
from dicom_node.facts import SeriesFacts, read_series_facts
from dicom_node.followup import study_datetime

_IDENTITY_TAGS = ["PatientID", "IssuerOfPatientID", "StudyDate", "StudyTime"]
# How a reason begins when a prior was found (a routing summary names only those, so that
# without a prior the line reads as it did before).
FOUND = "prior:"


@dataclass(frozen=True)
class StudyIdentity:
    """Whose study it is and when it was made, from one stored instance's header."""

    patient_id: str
    issuer: str
    made: datetime | None

    def same_patient(self, other: StudyIdentity) -> bool:
        """The same PatientID, and the same issuer when both name one (PS3.3 C.7.1.1: an ID
        is unique only within its issuer)."""
        if not self.patient_id or self.patient_id != other.patient_id:
            return False
        return not (self.issuer and other.issuer and self.issuer != other.issuer)


@dataclass(frozen=True)
class PriorFound:
    """The prior series chosen for an algorithm, or None and why (``reason``, for a person:
    days and series numbers, no patient data)."""

    series_uid: str | None
    reason: str
    study_uid: str | None = None


def study_identity(path: Path) -> StudyIdentity | None:
    """Whose study a stored instance belongs to and when it was made; None when its header
    cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_IDENTITY_TAGS)
    except Exception:  # an unreadable header is a study we cannot compare with, not a failure
        return None
    return StudyIdentity(
        str(ds.get("PatientID") or "").strip(),
        str(ds.get("IssuerOfPatientID") or "").strip(),
        study_datetime(ds),
    )


def _studies(data_dir: Path, db: Database) -> dict[str, Path]:
    """One stored instance of every study on the node."""
    with db.reading() as conn:
        rows = conn.execute(
            "SELECT study_uid, MIN(path) AS path FROM instances GROUP BY study_uid"
        ).fetchall()
    return {row["study_uid"]: data_dir / row["path"] for row in rows}


def _completed_series(db: Database, study_uid: str) -> list[str]:
    """The series of a study that have completed (a series still arriving is no prior yet)."""
    with db.reading() as conn:
        return [
            row[0]
            for row in conn.execute(
                "SELECT series_uid FROM series WHERE study_uid = ? AND completed_at IS NOT NULL"
                " ORDER BY first_received",
                (study_uid,),
            )
        ]


def study_of_series(db: Database, series_uid: str) -> str | None:
    """The study a series belongs to; None when the index does not know the series."""
    with db.reading() as conn:
        row = conn.execute(
            "SELECT study_uid FROM series WHERE series_uid = ?", (series_uid,)
        ).fetchone()
    return str(row[0]) if row is not None else None


def find_prior(
    data_dir: Path,
    db: Database,
    study_uid: str,
    spec: PriorSpec,
    fits: Callable[[SeriesFacts], bool],
) -> PriorFound:
    """The series of the most recent earlier study of the same patient, at most
    ``spec.max_age_days`` before ``study_uid``, for which ``fits`` holds (the routing rule's
    test for the algorithm's input); of several in one study, the one with the most slices,
    then the latest series number."""
    studies = _studies(data_dir, db)
    if study_uid not in studies:
        return PriorFound(None, "no prior: the study has no stored instance")
    current = study_identity(studies[study_uid])
    if current is None or not current.patient_id:
        return PriorFound(None, "no prior: the study has no PatientID")
    if current.made is None:
        return PriorFound(None, "no prior: the study has no StudyDate")
    earlier: list[tuple[datetime, str]] = []
    for uid, path in studies.items():
        if uid == study_uid:
            continue
        other = study_identity(path)
        if other is not None and other.same_patient(current) and other.made is not None:
            earlier.append((other.made, uid))
    earlier = sorted(((made, uid) for made, uid in earlier if made < current.made), reverse=True)
    if not earlier:
        return PriorFound(None, "no prior: no earlier study of the patient on the node")
    age = spec.max_age_days
    within = [(made, uid) for made, uid in earlier if (current.made - made).days <= age]
    if not within:
        latest = (current.made - earlier[0][0]).days
        return PriorFound(
            None,
            f"no prior: the latest earlier study is {latest} days older, more than"
            f" {spec.max_age_days}",
        )
    for made, uid in within:
        chosen = [
            facts
            for series_uid in _completed_series(db, uid)
            if fits(facts := read_series_facts(data_dir, db, series_uid))
        ]
        if chosen:
            best = max(chosen, key=lambda f: (f.slices, f.series_number or 0))
            days = (current.made - made).days
            number = best.series_number if best.series_number is not None else "?"
            return PriorFound(
                best.series_uid, f"{FOUND} series {number} of a study {days} days earlier", uid
            )
    return PriorFound(
        None,
        f"no prior: {len(within)} earlier stud{'y' if len(within) == 1 else 'ies'} of the"
        " patient, none with a series the rule takes",
    )
