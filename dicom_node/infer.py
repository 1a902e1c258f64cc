"""The inference worker: runs routed algorithms in a process of its own.

The worker touches only the job store and the instance store (files and index), never the
SCP's memory, so a model that crashes, segfaults or is killed for memory takes down only the
worker; ``serve`` supervises it, returns the job it held to the queue (its attempt counted),
and starts a new one. Algorithms are loaded once, on first use, and kept warm between jobs.

Each result is written as plain data (``result.json`` and ``.npy`` arrays) under
``<data_dir>/results/<job id>/attempt-<n>/`` (one folder per attempt, so an attempt that lost
its job cannot overwrite the files of the one that holds it); then written as DICOM.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from dicom_node.algorithm import Algorithm, AlgorithmResult, InputError, SeriesInput
from dicom_node.config import NodeConfig
from dicom_node.database import RESULTS_DIR, Database, database_path
from dicom_node.errors import InputFault, Permanent, SetupFault
from dicom_node.jobs import Job, JobKind, JobStore, job_store
from dicom_node.logs import raised_where, setup_logging
from dicom_node.loops import Loop
from dicom_node.plugins import catalogue, discover, resolve_device
from dicom_node.store import fsync_tree, store_key
from dicom_node.write import Provenance, Written, write_all

log = logging.getLogger(__name__)


def series_input(
    db: Database, data_dir: Path, series_uid: str, received_by: float | None = None
) -> SeriesInput:
    """The stored instances of a series; with ``received_by``, only those received by then.

    A job runs on what its completion saw: instances that arrive later (a sender that sends
    one series in several associations, a resend) reopen the series, whose next completion
    is decided, and run, on its own.
    """
    window = "" if received_by is None else " AND received_at <= ?"
    with db.reading() as conn:
        rows = conn.execute(
            f"SELECT path FROM instances WHERE series_uid = ?{window} ORDER BY path",
            (series_uid,) if received_by is None else (series_uid, received_by),
        ).fetchall()
    if not rows:
        raise InputError(
            f"series {store_key(series_uid)} has no stored instances"
            + ("" if received_by is None else " of this completion (a later send replaced them)")
        )
    return SeriesInput(series_uid, tuple(data_dir / r["path"] for r in rows))


HEARTBEAT_S = 5.0  # how often a worker says it is alive (workers.heartbeat_at)


def gpu_memory(device: str) -> dict[str, int] | None:
    """Allocated, reserved and total memory of a CUDA device, in bytes; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    import torch

    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "total": torch.cuda.get_device_properties(device).total_memory,
    }


def made_by(result: AlgorithmResult, provenance: Provenance) -> AlgorithmResult:
    """``result`` saying who made it as the node knows it: the registered algorithm's name and
    version, and whether the weights it loaded are the demo ones. Whatever the plugin put
    there is replaced, so that ``result.json`` says what the SEG, SR and SC say (the writers
    read the same :class:`Provenance`)."""
    return replace(
        result,
        algorithm=provenance.algorithm,
        version=provenance.version,
        demo=provenance.weights.demo,
    )


class Worker:
    """Claims inference jobs and runs them, one at a time, until stopped."""

    def __init__(self, config: NodeConfig, *, name: str | None = None) -> None:
        self.config = config
        self.data_dir = config.store.data_dir.resolve()
        self.db = Database(database_path(self.data_dir))
        self.jobs = job_store(self.db, priority_aging_s=config.worker.priority_aging_s)
        self.name = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.device = resolve_device(config.worker.device)
        self._registry = discover()
        self._catalogue = catalogue(self._registry, config.algorithms, self.device)
        self._loaded: dict[str, Algorithm] = {}
        # Who made each result, fixed at load: hashing the weights file per job would cost
        # seconds for public weights and could name a file replaced since it was loaded.
        self._provenance: dict[str, Provenance] = {}
        # A plain flag, not a threading.Event: stop() runs as a signal handler, and an Event
        # takes a lock that the interrupted main thread may hold inside Event.wait.
        self._stopping = False
        if config.worker.cpu_threads is not None:
            _set_torch_threads(config.worker.cpu_threads)

    def algorithm(self, name: str) -> Algorithm:
        """The algorithm, loaded on first use and kept warm."""
        if name not in self._loaded:
            registration = self._registry.get(name)
            if registration is None or registration.algorithm is None:
                why = registration.error if registration else "not installed"
                raise LookupError(f"algorithm {name} cannot be used: {why}")
            started = time.perf_counter()
            instance = registration.algorithm(self.config.algorithms.get(name))
            instance.load(self.device)
            weights = instance.weights()
            log.info(
                "loaded %s %s on %s in %.1f s (weights: %s)",
                name,
                instance.version,
                self.device,
                time.perf_counter() - started,
                weights.describe(),
            )
            self._loaded[name] = instance
            cls = registration.algorithm  # the registered class says who made the results
            self._provenance[name] = Provenance(
                cls.name, cls.version, weights, self.config.results.series_description
            )
        return self._loaded[name]

    def run_job(self, job: Job) -> tuple[Path, list[Written], float]:
        payload = job.inference
        algorithm = self.algorithm(payload.algorithm)
        received_by = self.jobs.completed_at(job)
        inputs = {
            name: series_input(self.db, self.data_dir, uid, received_by)
            for name, uid in payload.inputs.items()
        }
        if set(inputs) != set(algorithm.inputs.roles):
            raise ValueError(
                f"job inputs {sorted(inputs)} do not match {algorithm.name}'s "
                f"{list(algorithm.inputs.roles)}"
            )
        started = time.perf_counter()
        provenance = self._provenance[payload.algorithm]
        result = made_by(algorithm.run(inputs), provenance)
        # One folder per attempt: an attempt that lost the job (its node restarted) may still
        # be writing when the attempt that holds it commits, and must not overwrite its files.
        folder = self.data_dir / RESULTS_DIR / str(job.id) / f"attempt-{job.attempts}"
        path = result.save(folder)
        ran = time.perf_counter() - started
        written = write_all(result, inputs, provenance, folder / "dicom", self.config.results)
        if self.config.store.fsync:
            # On disk before the transaction that records them: a committed job's files are
            # what will be delivered, so a power cut must not leave them empty.
            fsync_tree(folder)
        log.info(
            "job %d: %s ran in %.2f s, wrote %s in %.2f s%s",
            job.id,
            algorithm.name,
            ran,
            ", ".join(w.kind for w in written) or "nothing",
            time.perf_counter() - started - ran,
            " (DEMO weights)" if result.demo else "",
        )
        return path, written, ran

    def work_once(self) -> Job | None:
        job = self.jobs.claim(self.name, (JobKind.INFERENCE,))
        if job is None:
            return None
        try:
            path, written, ran = self.run_job(job)
        except Exception as exc:
            # errors.py's vocabulary: a Permanent failure (the input's fault, or the node's
            # setup's: weights that do not fit fit no better next time) ends the job at once;
            # anything else may be passing and is tried again up to worker.max_attempts.
            final = isinstance(exc, Permanent)
            state = self.jobs.fail(
                job.id,
                f"{type(exc).__name__}: {exc}",
                worker=self.name,
                max_attempts=job.attempts if final else self.config.worker.max_attempts,
            )
            # Not the message or the traceback above DEBUG: they may quote the patient's data
            # (pydicom's "Unable to convert '1923-04-17' to 'DA' object", say).
            log.error(
                "job %d failed (attempt %d, now %s%s): %s; the details are logged at DEBUG",
                job.id,
                job.attempts,
                state.value if state else "another worker's",
                _not_retried(exc),
                _raised_at(exc),
            )
            log.debug("job %d failed", job.id, exc_info=exc)
            return job
        with self.db.transaction() as conn:
            if not self.jobs.holds(conn, job.id, self.name):
                # Queued again while we ran it (our node restarted): another attempt owns it
                # now, and recording ours too would leave one job with two sets of objects.
                log.warning(
                    "job %d was taken from %s while it ran; result dropped", job.id, self.name
                )
                return job
            conn.execute(
                "INSERT OR REPLACE INTO results (job_id, algorithm, path, created_at, device,"
                " run_s) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.inference.algorithm,
                    str(path.relative_to(self.data_dir)),
                    time.time(),
                    self.device,
                    ran,
                ),
            )
            # Written once per job: a retry after a crash rewrites the files and only the
            # committed attempt's objects (their SOP Instance UIDs) are ever delivered.
            conn.executemany(
                "INSERT OR REPLACE INTO outputs (sop_instance_uid, job_id, kind, sop_class_uid,"
                " series_uid, study_uid, path) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        w.sop_instance_uid,
                        job.id,
                        w.kind,
                        w.sop_class_uid,
                        w.series_uid,
                        w.study_uid,
                        str(w.path.relative_to(self.data_dir)),
                    )
                    for w in written
                ],
            )
            if written:  # with the results, in the same transaction: none is ever lost
                self.jobs.schedule_deliveries(conn, job.id, job.inference)
            self.jobs.mark_succeeded(conn, job.id)
        attempt = path.parent
        for other in attempt.parent.iterdir():  # what earlier attempts of the job left
            if other != attempt:
                shutil.rmtree(other, ignore_errors=True)
        return job

    def serve(self, poll_s: float = 0.2, *, parent_pid: int | None = None) -> None:
        """Work until stopped, or until the process ``parent_pid`` (the node) is gone."""
        log.info("%s ready on %s", self.name, self.device)
        self._register()
        beating = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        beating.start()
        while not self._stopping:
            if parent_pid is not None and os.getppid() != parent_pid:
                # An orphan would go on claiming jobs beside the worker of a restarted node.
                log.warning("%s: the node process is gone; stopping", self.name)
                break
            if self.work_once() is None:
                time.sleep(poll_s)
        self._stopping = True
        beating.join()
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE workers SET stopped_at = ? WHERE name = ?", (time.time(), self.name)
            )
        self.db.close()

    def _register(self) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers (name, pid, host, device, started_at,"
                " heartbeat_at, algorithms, gpu_memory) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.name,
                    os.getpid(),
                    socket.gethostname(),
                    self.device,
                    now,
                    now,
                    json.dumps(self._catalogue),
                    json.dumps(gpu_memory(self.device)),
                ),
            )

    def _beat(self) -> None:
        """Say we are alive every few seconds, also in the middle of a long job: the node's
        readiness and the dashboard tell a busy worker from a dead one by it."""
        while not self._stopping:
            deadline = time.monotonic() + HEARTBEAT_S
            while not self._stopping and time.monotonic() < deadline:
                time.sleep(0.2)
            try:
                with self.db.transaction() as conn:
                    conn.execute(
                        "UPDATE workers SET heartbeat_at = ?, gpu_memory = ? WHERE name = ?",
                        (time.time(), json.dumps(gpu_memory(self.device)), self.name),
                    )
            except Exception:  # a busy or failing database must not kill the worker
                log.exception("heartbeat of %s not recorded", self.name)

    def stop(self, *_: object) -> None:
        """Stop after the job in hand; safe to call from a signal handler."""
        self._stopping = True


# A UID in an error's text (PS3.5 9.1: a root 0, 1 or 2 and dotted numbers), logged hashed.
_UID_IN_TEXT = re.compile(r"(?<![\d.])[0-2](?:\.(?:0|[1-9]\d*)){3,}(?![\d.])")


def _raised_at(exc: BaseException) -> str:
    """What an operator may read of a failure: the node's own permanent errors in full (they
    are written without patient data; a UID in them is shown hashed, as the store names it on
    disk), else the type and the line that raised it: a third-party message may quote the
    data."""
    if isinstance(exc, Permanent):
        text = _UID_IN_TEXT.sub(lambda uid: store_key(uid[0])[:12], str(exc))
        return f"{type(exc).__name__}: {text}"
    return raised_where(exc)


def _not_retried(exc: BaseException) -> str:
    """Why a failed job is not tried again, for its log line ("" when it is)."""
    if isinstance(exc, InputFault):
        return ", not retried: the same input fails the same way"
    if isinstance(exc, SetupFault):
        return ", not retried: it fails the same way until the node's setup is changed"
    if isinstance(exc, Permanent):
        return ", not retried: trying again cannot help"
    return ""


def _set_torch_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def worker_main(config: NodeConfig, name: str, parent_pid: int | None = None) -> None:
    """Entry of a worker process: started by :class:`WorkerSupervisor` with the node's pid
    as ``parent_pid``, or on its own by ``dicom-node worker``."""
    setup_logging(config.logging.level, process="[worker]")
    if parent_pid is not None:
        _terminate_with_parent()
    worker = Worker(config, name=name)

    def on_sigterm(*_: object) -> None:
        if parent_pid is not None and os.getppid() != parent_pid:
            # The node died (PR_SET_PDEATHSIG); its restart queues our job again for a new
            # worker, so finishing it here would run it twice, side by side. os.write, not
            # logging: a handler must not take the lock the interrupted thread may hold.
            os.write(2, f"{name}: the node is gone; stopping without finishing the job\n".encode())
            os._exit(1)
        worker.stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops us with SIGTERM, in order
    worker.serve(parent_pid=parent_pid)


def _terminate_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), so that a node
    killed with SIGKILL does not leave its worker behind; the poll in
    :meth:`Worker.serve` covers other systems."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent poll")


class WorkerSupervisor:
    """Keeps one worker process running beside the SCP and cleans up after it dies."""

    RESTART_DELAY_S = 1.0

    def __init__(self, config: NodeConfig, jobs: JobStore) -> None:
        self.config = config
        self.jobs = jobs
        self._context = multiprocessing.get_context("spawn")  # no inherited threads or locks
        self._process: multiprocessing.process.BaseProcess | None = None
        self._name = ""
        self._generation = 0
        # The watch runs under a Loop: a database error while reaping (requeue_worker) makes
        # it back off and try again, never ends supervision.
        self.loop = Loop("worker-supervisor", self._watch, 0.2)

    @property
    def name(self) -> str:
        return self._name

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _spawn(self) -> None:
        self._generation += 1
        self._name = f"worker-{socket.gethostname()}-{os.getpid()}-{self._generation}"
        self._process = self._context.Process(
            target=worker_main,
            args=(self.config, self._name, os.getpid()),
            name=self._name,
            daemon=True,
        )
        self._process.start()
        log.info("started inference worker %s (pid %d)", self._name, self._process.pid)

    def _reap(self) -> None:
        assert self._process is not None
        code = self._process.exitcode
        cause = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        moved = self.jobs.requeue_worker(
            self._name,
            f"the worker died ({cause}) while running this job",
            max_attempts=self.config.worker.max_attempts,
        )
        log.error(
            "inference worker %s died (%s); %d job(s) it held returned", self._name, cause, moved
        )

    def _watch(self) -> None:
        if self._process is not None and not self._process.is_alive():
            self._reap()
            if self.loop.stopping(self.RESTART_DELAY_S):
                return
            self._spawn()

    def start(self) -> None:
        self._spawn()
        self.loop.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.loop.stop()
        if self._process is not None and self._process.is_alive():
            self._process.terminate()  # SIGTERM: the worker finishes its job, then exits
            self._process.join(timeout_s)
            if self._process.is_alive():
                log.warning("inference worker did not stop in %.0f s; killing it", timeout_s)
                self._process.kill()
                self._process.join()
