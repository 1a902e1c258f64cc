"""``dicom-node worker --cluster``: a GPU host's worker in cluster mode (issue 17).

A Celery worker (prefork) consumes the doorbells of the algorithms installed here. Each child
process is given a GPU in turn, as the embedded supervisor gives its workers
(:func:`dicom_node.infer.worker_environments`): ``CUDA_VISIBLE_DEVICES`` is set in the child
as it starts, before anything there imports torch, and the child loads each model once, on its
first job, and keeps it warm. The parent imports neither torch nor any plugin.

A doorbell's task claims from PostgreSQL (the best queued, staged job of this host's
algorithms, with a lease and an attempt token: a duplicate doorbell claims nothing), renews
the lease from a thread while the job runs, fetches the staged inputs into a scratch folder,
runs the job through the same core as the embedded worker (:class:`dicom_node.infer.Runner`),
uploads the results under ``results/<job>/attempt-<n>/`` and commits them only if the attempt
still holds the job (:func:`dicom_node.infer.commit_attempt` with the token). A refused
commit is logged and dropped (another attempt owns the job); a failure is recorded as the
embedded worker records it (Permanent ends the job, anything else is retried). The scratch
folder is removed whatever happened.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.database import open_database
from dicom_node.dispatch import TASK_NAME, celery_app, queue_name
from dicom_node.errors import ObjectStoreError, ObjectStoreUnavailable
from dicom_node.infer import (
    Runner,
    WorkerRecord,
    attempt_folder,
    commit_attempt,
    record_failure,
    worker_environments,
)
from dicom_node.jobs import Job, JobKind, JobState, job_store
from dicom_node.objects import object_store
from dicom_node.plugins import ENTRY_POINT_GROUP
from dicom_node.staging import fetch_inputs, manifest_key, upload_tree

log = logging.getLogger(__name__)

# A doorbell whose job is queued and staged but not claimable yet (its row still locked by
# the node's record of the ring) is answered again after this pause, this many times.
DOORBELL_RETRIES = 40
DOORBELL_RETRY_S = 0.05

# How long an attempt whose object store stopped answering (a restart, a network cut) waits,
# its lease renewed, for the store to answer again before it records its failure. A failed
# job is rung again at once, so failures recorded at once would spend all of a job's attempts
# within seconds of an outage that a later attempt would have outlived (seen in
# tests/test_cluster_outages.py: a SeaweedFS restart during an upload cost five attempts).
STORE_OUTAGE_WAIT_S = 60.0


def installed_algorithms() -> list[str]:
    """The algorithms whose queues this host consumes: the installed entry points' names,
    read without importing a plugin (the parent must not import torch). A child that cannot
    import one claims none of its jobs, which another host runs."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


class LeaseKeeper:
    """Renews an attempt's lease every third of ``lease_s`` from a thread of its own while
    the job runs; :attr:`lost` once a renewal says the attempt no longer holds the job."""

    def __init__(self, renew: Any, job: Job, lease_s: float) -> None:
        if job.token is None:
            raise ValueError(f"job {job.id} was claimed without an attempt token")
        self._renew = renew
        self.job = job
        self.token: str = job.token
        self.lease_s = lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                held = bool(self._renew(self.job.id, self.token, self.lease_s))
            except Exception:  # the database is down: try again; the lease may still hold
                log.warning("job %d: lease not renewed (database unreachable)", self.job.id)
                continue
            if not held:
                # Taken back (our lease ran out: this host froze or lost the database) or
                # cancelled: our commit will be refused; the run goes on to its end.
                self.lost = True
                log.warning("job %d: this attempt lost the job; its result will be refused",
                            self.job.id)  # fmt: skip
                return


class ClusterWorker:
    """One Celery child's worker: its database, job store, object store, warm algorithms and
    row in the ``workers`` table; :meth:`answer` is a doorbell's task."""

    def __init__(self, config: NodeConfig, name: str, scratch_root: Path) -> None:
        self.config = config
        self.name = name
        self.scratch_root = scratch_root
        scratch_root.mkdir(parents=True, exist_ok=True)
        self.db = open_database(config)
        self.jobs = job_store(self.db, priority_aging_s=config.worker.priority_aging_s)
        self.objects = object_store(config.cluster.objects)
        self.runner = Runner(config)
        self.record = WorkerRecord(self.db, name, self.runner.device, self.runner.catalogue)
        self.record.register()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info(
            "%s ready on %s%s",
            name,
            self.runner.device,
            "" if gpu is None else f" (CUDA_VISIBLE_DEVICES={gpu})",
        )

    def answer(self, job_id: int) -> Job | None:
        """A doorbell (``job_id``, only for the log: the claim takes the best job there is):
        claim, run, upload and commit one job; the job it took, or None."""
        if self.record.doing[0] is not None:
            self.record.progress(None, None)
        job = self._claim()
        # A doorbell can overtake the node's record of its ring (Sweeper.ring_due records
        # after publishing): until that commits the row is locked, and the claim, FOR UPDATE
        # SKIP LOCKED, passes over it. Seen as a job left queued until the next ring
        # (cluster.redispatch_s, 120 s by default) in benchmarks/cluster.py. While the job
        # rung is still queued and staged, claim again shortly.
        for _ in range(DOORBELL_RETRIES):
            if job is not None or not self._still_due(job_id):
                break
            time.sleep(DOORBELL_RETRY_S)
            job = self._claim()
        if job is None:  # a duplicate, or a job another worker took first: nothing to do
            log.debug("doorbell of job %d: nothing to claim", job_id)
            return None
        scratch = Path(tempfile.mkdtemp(prefix=f"job-{job.id}-", dir=self.scratch_root))
        try:
            self._run(job, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            self.record.progress(None, None)
        return job

    def _claim(self) -> Job | None:
        return self.jobs.claim(
            self.name,
            (JobKind.INFERENCE,),
            algorithms=self.runner.runnable,
            concurrency=self.config.worker.concurrency,
            lease_s=self.config.cluster.lease_s,
            staged_only=True,
        )

    def _still_due(self, job_id: int) -> bool:
        rung = self.jobs.get(job_id)
        return rung is not None and rung.state == JobState.QUEUED and rung.staged_at is not None

    def _run(self, job: Job, scratch: Path) -> None:
        loaded = self.runner.loaded(job.inference.algorithm)
        self.record.progress(job.id, "running" if loaded else "loading")
        with LeaseKeeper(self.jobs.renew_lease, job, self.config.cluster.lease_s) as lease:
            try:
                # Loaded before the inputs are fetched, as the embedded worker does: a setup
                # fault is what the failure says, whatever the inputs.
                self.runner.algorithm(job.inference.algorithm)
                self.record.progress(job.id, "fetching")
                inputs = fetch_inputs(job.id, self.objects, scratch)
                attempt = self.runner.run(
                    job,
                    inputs,
                    attempt_folder(scratch, job),
                    lambda phase: self.record.progress(job.id, phase),
                )
                self.record.progress(job.id, "uploading")
                upload_tree(attempt.path.parent, self.objects, scratch)
            except Exception as exc:
                if isinstance(exc, ObjectStoreUnavailable):
                    self._await_store(job, lease)
                record_failure(
                    self.jobs,
                    job,
                    exc,
                    worker=self.name,
                    max_attempts=self.config.worker.max_attempts,
                    token=job.token,
                )
                return
        committed = commit_attempt(
            self.db,
            self.jobs,
            job,
            attempt,
            worker=self.name,
            root=scratch,
            device=self.runner.device,
            token=job.token,
        )
        if not committed:
            log.warning(
                "job %d: %s's attempt %d no longer holds it (its lease ran out or it was"
                " cancelled); result dropped",
                job.id,
                self.name,
                job.attempts,
            )

    def _await_store(self, job: Job, lease: LeaseKeeper) -> None:
        """Wait until the object store answers again (at most :data:`STORE_OUTAGE_WAIT_S`,
        and only while this attempt holds the job), so that the failure recorded next is
        retried on a store that works."""
        log.warning(
            "job %d: the object store is unavailable; waiting up to %g s for it before"
            " recording the failure",
            job.id,
            STORE_OUTAGE_WAIT_S,
        )
        deadline = time.monotonic() + STORE_OUTAGE_WAIT_S
        pause = 0.2
        while time.monotonic() < deadline and not lease.lost:
            try:
                # A read of an object stored before the outage, not a listing: a restarted
                # SeaweedFS answers listings and new writes a moment before its volumes serve
                # the old objects again.
                self.objects.get_bytes(manifest_key(job.id))
                return
            except ObjectStoreUnavailable:
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            except ObjectStoreError:  # it answers (a missing manifest is the next try's fault)
                return

    def close(self) -> None:
        self.record.stopped()
        self.db.close()


# The child's worker, made in the child (worker_process_init): nothing of it is forked.
_child: ClusterWorker | None = None


def scratch_root(config: NodeConfig) -> Path:
    """``cluster.scratch_dir``, created, else a temporary folder of this host's."""
    if config.cluster.scratch_dir is not None:
        config.cluster.scratch_dir.mkdir(parents=True, exist_ok=True)
        return config.cluster.scratch_dir.resolve()
    return Path(tempfile.mkdtemp(prefix="dicom-node-scratch-"))


def cluster_worker_main(config: NodeConfig, name: str, processes: int | None = None) -> int:
    """Run the Celery worker until stopped (SIGTERM: warm shutdown, the jobs in hand finish;
    a second SIGTERM or SIGQUIT: cold). ``processes``: children (default: one per GPU, as
    ``worker.processes`` / ``worker.processes_per_gpu`` say for the embedded worker)."""
    from billiard.process import current_process  # type: ignore[import-untyped]
    from celery import signals  # type: ignore[import-untyped]

    if not config.cluster.enabled:
        raise ValueError("worker --cluster needs the cluster: section (cluster.database_url)")
    environments = worker_environments(config)
    count = processes if processes is not None else len(environments)
    if count < 1:
        raise ValueError(f"--processes must be at least 1, not {count}")
    algorithms = installed_algorithms()
    if not algorithms:
        raise ValueError(f"no algorithm is installed (entry points {ENTRY_POINT_GROUP})")
    root = scratch_root(config)
    app = celery_app(config.cluster, algorithms)

    @app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
    def run_job(job_id: int) -> None:
        if _child is None:
            raise RuntimeError("the worker process was not initialised")
        _child.answer(job_id)

    def child_started(**_: Any) -> None:
        global _child
        index = int(getattr(current_process(), "index", 0) or 0)
        # Before anything here imports torch: CUDA reads CUDA_VISIBLE_DEVICES at its start.
        os.environ.update(environments[index % len(environments)])
        _child = ClusterWorker(config, f"{name}-{index}", root)

    def child_stopping(**_: Any) -> None:
        if _child is not None:
            _child.close()

    signals.worker_process_init.connect(child_started, weak=False)
    signals.worker_process_shutdown.connect(child_stopping, weak=False)
    log.info(
        "%s: %d process(es), queues %s, scratch under %s",
        name,
        count,
        ", ".join(queue_name(a) for a in algorithms),
        root,
    )
    worker = app.Worker(
        hostname=f"{name}@{socket.gethostname()}",
        pool="prefork",
        concurrency=count,
        queues=[queue_name(a) for a in algorithms],
        loglevel=config.logging.level,
        without_mingle=True,
        without_gossip=True,
        optimization="fair",  # a child gets a message only when it is free
    )
    worker.start()
    return int(worker.exitcode or 0)
