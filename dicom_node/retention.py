"""Retention: patient data leaves the disk once it has done its work, and not before.

Received instances are deleted ``retention.instances_hours`` after every route of their study
delivered (or the study was routed nowhere); result files ``retention.results_hours`` after
they were delivered. Nothing with a queued or running job or an undelivered (pending or dead)
delivery is touched. The index keeps the records; the ``purges`` table says what went when.

In cluster mode the object store holds copies too: a study's staged inputs and a job's manifest
and results (:mod:`dicom_node.staging`). They go with the local files, under the same rules and
first: a store that fails raises (a Transient :class:`~dicom_node.errors.ObjectStoreUnavailable`,
so the retention loop backs off and tries again) before any local file is touched, and the purge
is recorded only once both are gone.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import RetentionConfig
from dicom_node.database import RESULTS_DIR, Database
from dicom_node.events import DataDeleted, Events, StudyRef, study_refs
from dicom_node.jobs import DeliveryProgress, JobStore, job_store

if TYPE_CHECKING:
    from dicom_node.objects import ObjectStore

log = logging.getLogger(__name__)


def _delete(paths: Sequence[Path]) -> tuple[int, int]:
    files = size = 0
    for path in paths:
        try:
            size += path.stat().st_size
            path.unlink()
            files += 1
        except FileNotFoundError:
            pass
    return files, size


def purge_expired(
    db: Database,
    data_dir: Path,
    retention: RetentionConfig,
    now: float,
    events: Events | None = None,
    objects: ObjectStore | None = None,
) -> int:
    """Delete received instances and result files whose retention ran out; how many sets.

    ``objects``: cluster mode's object store, whose staged inputs and results of the same
    study or job go first (see the module's docstring).
    """
    events = events or Events()
    if objects is not None:
        # Cluster-only: staging imports nothing of the extra, but embedded mode needs none of it.
        from dicom_node.staging import purge_job, purge_study
    jobs = job_store(db)
    purged = 0
    with db.reading() as conn:
        # A study is done no earlier than it completed: younger ones need no closer look.
        studies = conn.execute(
            "SELECT study_uid, completed_at FROM studies WHERE completed_at <= ?"
            " AND 'study:' || study_uid NOT IN (SELECT subject FROM purges)",
            (now - retention.instances_hours * 3600,),
        ).fetchall()
    for study in studies:
        done_at = _study_done_at(db, jobs, study["study_uid"], study["completed_at"])
        if done_at is None or now - done_at < retention.instances_hours * 3600:
            continue
        with db.reading() as conn:
            paths = [
                data_dir / r["path"]
                for r in conn.execute(
                    "SELECT path FROM instances WHERE study_uid = ?", (study["study_uid"],)
                )
            ]
        # The patient is named in the audit record, read before the files go.
        (ref,) = study_refs(paths[:1]) or (StudyRef(study["study_uid"], None, 0),)
        # The store's copies first: should it fail, the local files (and the audit's record of
        # them) are still all here when the loop tries again.
        stored = (
            purge_study(study["study_uid"], objects)
            + _purge_unfinished(jobs, study["study_uid"], objects)
            if objects is not None
            else 0
        )
        files, size = _delete(paths)
        _record_purge(db, f"study:{study['study_uid']}", now, files, size)
        log.info(
            "retention: deleted %d received file(s), %d bytes, and %d staged object(s) of a study",
            files,
            size,
            stored,
        )
        events.emit(
            DataDeleted(
                "received instances",
                (StudyRef(study["study_uid"], ref.patient_id, files),),
                files,
                size,
            )
        )
        purged += 1
    with db.reading() as conn:
        results = conn.execute(
            "SELECT job_id, created_at FROM results"
            " WHERE 'job:' || job_id NOT IN (SELECT subject FROM purges)"
        ).fetchall()
    progress = jobs.delivery_progress([r["job_id"] for r in results])
    for job in results:
        delivered = progress.get(job["job_id"], DeliveryProgress(None, 0))
        done_at = delivered.last_sent_at or job["created_at"]
        if delivered.open or now - done_at < retention.results_hours * 3600:
            continue
        folder = data_dir / RESULTS_DIR / str(job["job_id"])
        paths = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        result_studies = study_refs(p for p in paths if p.suffix == ".dcm")
        stored = purge_job(job["job_id"], objects) if objects is not None else 0
        files, size = _delete(paths)
        shutil.rmtree(folder, ignore_errors=True)
        _record_purge(db, f"job:{job['job_id']}", now, files, size)
        log.info(
            "retention: deleted job %d's %d result file(s) and %d object(s)",
            job["job_id"],
            files,
            stored,
        )
        events.emit(DataDeleted(f"results of job {job['job_id']}", result_studies, files, size))
        purged += 1
    return purged


def _purge_unfinished(jobs: JobStore, study_uid: str, objects: ObjectStore) -> int:
    """The study's jobs that left no results (failed, cancelled): their manifests and any
    attempt's uploads go with the study's inputs, since no results rule will ever reach them
    (a job with results goes with them, by its own rule). How many objects."""
    from dicom_node.staging import purge_job

    return sum(
        purge_job(record.job.id, objects)
        for record in jobs.inference_records(study_uid=study_uid, limit=10_000)
        if record.written_at is None
    )


def _study_done_at(
    db: Database, jobs: JobStore, study_uid: str, completed_at: float
) -> float | None:
    """When the last route of a study delivered; None while any job or delivery is open."""
    with db.reading() as conn:
        subjects = [study_uid] + [
            r["series_uid"]
            for r in conn.execute("SELECT series_uid FROM series WHERE study_uid = ?", (study_uid,))
        ]
    activity = jobs.activity(subjects)
    if activity.busy or activity.undelivered:
        return None
    return max(completed_at, activity.last_sent_at or 0.0, activity.last_finished_at or 0.0)


def _record_purge(db: Database, subject: str, now: float, files: int, size: int) -> None:
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO purges (subject, purged_at, files, bytes) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (subject) DO UPDATE SET purged_at = excluded.purged_at,"
            " files = excluded.files, bytes = excluded.bytes",
            (subject, now, files, size),
        )
