"""A person's hand on the queue: cancel a job, or queue a failed or cancelled one again.

``dicom-node jobs cancel|requeue ID`` and ``POST /api/jobs/<id>/cancel|requeue`` both come
here, so that both change the job the same way (through the :class:`~dicom_node.jobs.JobStore`)
and both leave the same audit record: who asked, from where, which job and whose study
(PS3.15 A.5.3 Procedure Record, :mod:`dicom_node.audit`).

A queued job that is cancelled is never claimed. A running one is marked cancelled at once:
its worker no longer holds it, so the worker's result is refused when it tries to commit
(``JobStore.holds``) and nothing of it is recorded or delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.database import Database
from dicom_node.events import Events, JobChanged, study_refs
from dicom_node.facts import series_paths
from dicom_node.jobs import InferencePayload, Job, JobState, JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What became of a request: ``changed``, or why not (no such job, or not in a state the
    action applies to); ``state`` is the job's state now (None: no such job)."""

    job_id: int
    changed: bool
    state: JobState | None
    was: JobState | None
    message: str


@dataclass(frozen=True)
class JobControl:
    """Cancels and requeues jobs for a person, audited through ``events``."""

    jobs: JobStore
    db: Database
    data_dir: Path
    events: Events

    def cancel(self, job_id: int, *, requestor: str, host: str | None) -> Outcome:
        return self._act(
            job_id,
            "cancelled",
            self.jobs.cancel,
            (JobState.QUEUED, JobState.RUNNING),
            requestor,
            host,
        )

    def requeue(self, job_id: int, *, requestor: str, host: str | None) -> Outcome:
        return self._act(
            job_id,
            "requeued",
            self.jobs.requeue,
            (JobState.FAILED, JobState.CANCELLED),
            requestor,
            host,
        )

    def _act(
        self,
        job_id: int,
        action: str,
        change: Callable[[int, str], Job | None],
        applies_to: tuple[JobState, ...],
        requestor: str,
        host: str | None,
    ) -> Outcome:
        by = requestor if host is None else f"{requestor} ({host})"
        before = change(job_id, by)
        if before is None:
            job = self.jobs.get(job_id)
            if job is None:
                return Outcome(job_id, False, None, None, f"no job {job_id}")
            only = " or ".join(s.value for s in applies_to)
            return Outcome(
                job_id,
                False,
                job.state,
                job.state,
                f"job {job_id} is {job.state.value}: only a {only} job can be {action}",
            )
        payload = before.payload
        inference = payload if isinstance(payload, InferencePayload) else None
        # The series it is on, whose study (and patient) the audit record names.
        series = list(inference.inputs.values()) if inference else [before.subject_uid]
        self.events.emit(
            JobChanged(
                job_id,
                action,
                before.state.value,
                inference.algorithm if inference else None,
                requestor,
                host,
                study_refs(series_paths(self.data_dir, self.db, series)),
            )
        )
        after = self.jobs.get(job_id)
        state = after.state if after is not None else None
        message = f"job {job_id} {action} (it was {before.state.value})"
        if before.state is JobState.RUNNING:
            message += f"; {before.worker}'s result will not be recorded"
        log.warning("%s by %s", message, by)
        return Outcome(job_id, True, state, before.state, message)
