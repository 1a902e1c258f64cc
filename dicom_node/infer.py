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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from dicom_node.algorithm import Algorithm, AlgorithmResult, InputError, SeriesInput
from dicom_node.config import NodeConfig
from dicom_node.database import RESULTS_DIR, Database, open_database
from dicom_node.errors import InputFault, Permanent, SetupFault
from dicom_node.jobs import Job, JobKind, JobState, JobStore, job_store
from dicom_node.logs import raised_where, setup_logging
from dicom_node.loops import Loop
from dicom_node.plugins import Registration, catalogue, discover, resolve_device
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


def prior_input(db: Database, data_dir: Path, series_uid: str) -> SeriesInput | None:
    """A prior study's series as a job takes it (the optional input of an algorithm that
    follows lesions up): all its instances, whenever they came, since a prior retrieved from a
    PACS arrives after the completion that asked for it; None when it is no longer there
    (retention removed it since routing), so that the current study is still read."""
    try:
        series = series_input(db, data_dir, series_uid)
    except InputError:
        series = None
    if series is None or not all(path.exists() for path in series.paths):
        log.warning("prior series %s is gone: run without it", store_key(series_uid)[:12])
        return None
    return series


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


@dataclass(frozen=True)
class Attempt:
    """One run of a job, written: ``result.json`` at ``path``, its DICOM objects, and how long
    the algorithm itself ran (reading its inputs included)."""

    path: Path
    written: list[Written]
    run_s: float


class Runner:
    """The core both kinds of worker share (the embedded :class:`Worker` and the cluster
    worker of :mod:`dicom_node.cluster_worker`): algorithms loaded once and kept warm, one
    job run on given inputs into an attempt folder and written as DICOM."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.device = resolve_device(config.worker.device)
        self.registry = discover()
        self.catalogue = catalogue(self.registry, config.algorithms, self.device)
        # What this worker can run: the installed algorithms that import; it claims no other
        # algorithm's job, which stays queued for a worker that can run it.
        self.runnable = tuple(sorted(n for n, r in self.registry.items() if r.algorithm))
        self._loaded: dict[str, Algorithm] = {}
        # Who made each result, fixed at load: hashing the weights file per job would cost
        # seconds for public weights and could name a file replaced since it was loaded.
        self._provenance: dict[str, Provenance] = {}
        if config.worker.cpu_threads is not None:
            _set_torch_threads(config.worker.cpu_threads)

    def loaded(self, name: str) -> bool:
        """Whether the algorithm is loaded already (a job of it starts running at once)."""
        return name in self._loaded

    def algorithm(self, name: str) -> Algorithm:
        """The algorithm, loaded on first use and kept warm."""
        if name not in self._loaded:
            registration = self.registry.get(name)
            if registration is None or registration.algorithm is None:
                why = registration.error if registration else "not installed"
                raise LookupError(f"algorithm {name} cannot be used: {why}")
            self._check_gpu_memory(name)
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

    def _check_gpu_memory(self, name: str) -> None:
        """Refuse to load a model on a GPU with less free memory than
        ``worker.min_free_gpu_memory_gb`` (processes sharing one GPU each load their own
        copy): the job is retried rather than the process dying of an out-of-memory error."""
        need_gb = self.config.worker.min_free_gpu_memory_gb
        if need_gb is None or not self.device.startswith("cuda"):
            return
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        if free < need_gb * 1e9:
            raise RuntimeError(
                f"not enough free memory on {self.device} to load {name}: {free / 1e9:.1f} GB"
                f" free of {total / 1e9:.1f} GB, worker.min_free_gpu_memory_gb is {need_gb:g}"
            )

    def run(
        self,
        job: Job,
        inputs: dict[str, SeriesInput],
        folder: Path,
        progress: Callable[[str], None] = lambda phase: None,
    ) -> Attempt:
        """Run ``job`` on ``inputs``: its result and DICOM objects written under ``folder``
        (the attempt's own, :func:`attempt_folder`); ``progress`` told each phase."""
        payload = job.inference
        algorithm = self.algorithm(payload.algorithm)
        progress("running")
        wrong = algorithm.inputs.mismatch(inputs)
        if wrong is not None:
            raise ValueError(f"job of {algorithm.name}: {wrong}")
        started = time.perf_counter()
        provenance = self._provenance[payload.algorithm]
        result = made_by(algorithm.run(inputs), provenance)
        path = result.save(folder)
        ran = time.perf_counter() - started
        progress("writing")
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
        return Attempt(path, written, ran)


def attempt_folder(root: Path, job: Job) -> Path:
    """Where an attempt of ``job`` writes under ``root`` (the data folder, or a cluster
    worker's scratch folder: the same relative path either way). One folder per attempt: an
    attempt that lost the job may still be writing when the attempt that holds it commits,
    and must not overwrite its files."""
    return root / RESULTS_DIR / str(job.id) / f"attempt-{job.attempts}"


def commit_attempt(
    db: Database,
    jobs: JobStore,
    job: Job,
    attempt: Attempt,
    *,
    worker: str,
    root: Path,
    device: str,
    token: str | None = None,
) -> bool:
    """Record an attempt's result, its objects and its deliveries and mark the job succeeded,
    in one transaction, if the attempt still holds the job (``JobStore.holds``, with the
    attempt's ``token`` when it has one); False when it does not, and nothing is recorded.
    Paths are recorded relative to ``root``."""
    with db.transaction() as conn:
        if not jobs.holds(conn, job.id, worker, token):
            # Queued again while we ran it (our node restarted, our lease ran out): another
            # attempt owns it now, and recording ours too would leave one job with two sets
            # of objects.
            return False
        conn.execute(
            "INSERT INTO results (job_id, algorithm, path, created_at, device, run_s)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET"
            " algorithm = excluded.algorithm, path = excluded.path,"
            " created_at = excluded.created_at, device = excluded.device,"
            " run_s = excluded.run_s",
            (
                job.id,
                job.inference.algorithm,
                str(attempt.path.relative_to(root)),
                time.time(),
                device,
                attempt.run_s,
            ),
        )
        # Written once per job: a retry after a crash rewrites the files and only the
        # committed attempt's objects (their SOP Instance UIDs) are ever delivered.
        conn.executemany(
            "INSERT INTO outputs (sop_instance_uid, job_id, kind, sop_class_uid, series_uid,"
            " study_uid, path) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid)"
            " DO UPDATE SET job_id = excluded.job_id, kind = excluded.kind,"
            " sop_class_uid = excluded.sop_class_uid, series_uid = excluded.series_uid,"
            " study_uid = excluded.study_uid, path = excluded.path",
            [
                (
                    w.sop_instance_uid,
                    job.id,
                    w.kind,
                    w.sop_class_uid,
                    w.series_uid,
                    w.study_uid,
                    str(w.path.relative_to(root)),
                )
                for w in attempt.written
            ],
        )
        if attempt.written:  # with the results, in the same transaction: none is ever lost
            jobs.schedule_deliveries(conn, job.id, job.inference)
        jobs.mark_succeeded(conn, job.id)
    return True


def record_failure(
    jobs: JobStore,
    job: Job,
    exc: BaseException,
    *,
    worker: str,
    max_attempts: int,
    token: str | None = None,
) -> JobState | None:
    """Record a failed attempt by errors.py's vocabulary, and log it: a Permanent failure (the
    input's fault, or the node's setup's: weights that do not fit fit no better next time)
    ends the job at once; anything else may be passing and is tried again up to
    ``max_attempts``."""
    final = isinstance(exc, Permanent)
    state = jobs.fail(
        job.id,
        f"{type(exc).__name__}: {exc}",
        worker=worker,
        max_attempts=job.attempts if final else max_attempts,
        token=token,
    )
    # Not the message or the traceback above DEBUG: they may quote the patient's data
    # (pydicom's "Unable to convert '1923-04-17' to 'DA' object", say).
    log.error(
        "job %d failed (attempt %d, now %s%s): %s; the details are logged at DEBUG",
        job.id,
        job.attempts,
        state.value if state else "no longer its own: cancelled, or queued again",
        _not_retried(exc),
        _raised_at(exc),
    )
    log.debug("job %d failed", job.id, exc_info=exc)
    return state


def remove_other_attempts(attempt: Path) -> None:
    """Delete what earlier attempts of a job left beside the committed ``attempt`` folder."""
    for other in attempt.parent.iterdir():
        if other != attempt:
            shutil.rmtree(other, ignore_errors=True)


class WorkerRecord:
    """A worker's row in the ``workers`` table: registered at start, the job in hand and its
    phase recorded as they change, a heartbeat every few seconds from a thread of its own
    (also in the middle of a long job: the node's readiness and the dashboard tell a busy
    worker from a dead one by it), the stop recorded at the end."""

    def __init__(self, db: Database, name: str, device: str, algorithms: object) -> None:
        self.db = db
        self.name = name
        self.device = device
        self.algorithms = algorithms
        # The job in hand, what the worker does with it and since when, for its heartbeat:
        # one tuple, replaced whole, so that the heartbeat thread never reads half of it.
        self.doing: tuple[int | None, str | None, float | None] = (None, None, None)
        # A plain flag, not a threading.Event: stop() may run in a signal handler, and an
        # Event takes a lock that the interrupted main thread may hold inside Event.wait.
        self._stopping = False
        self._thread: threading.Thread | None = None

    def register(self) -> None:
        """Record the worker (a name used again starts a fresh row) and start beating."""
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO workers (name, pid, host, device, started_at, heartbeat_at,"
                " algorithms, gpu_memory) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, host = excluded.host,"
                " device = excluded.device, started_at = excluded.started_at,"
                " heartbeat_at = excluded.heartbeat_at, stopped_at = NULL,"
                " algorithms = excluded.algorithms, gpu_memory = excluded.gpu_memory,"
                " job_id = NULL, job_phase = NULL, progress_at = NULL",
                (
                    self.name,
                    os.getpid(),
                    socket.gethostname(),
                    self.device,
                    now,
                    now,
                    json.dumps(self.algorithms),
                    json.dumps(gpu_memory(self.device)),
                ),
            )
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def progress(self, job_id: int | None, phase: str | None) -> None:
        """Record at once which job the worker is on and what it does with it (loading,
        running, writing): the heartbeat repeats it, so a beat says how far the job got, not
        only that the heartbeat thread lives. The supervisor measures the job's time limit
        from the job's claim and kills a worker that is over it, whatever it is doing."""
        if (job_id, phase) == self.doing[:2]:
            return
        self.doing = (job_id, phase, time.time())
        self._record(beat=False)

    def _record(self, *, beat: bool) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE workers SET job_id = ?, job_phase = ?, progress_at = ?"
                + (", heartbeat_at = ?, gpu_memory = ?" if beat else "")
                + " WHERE name = ?",
                (
                    *self.doing,
                    *((time.time(), json.dumps(gpu_memory(self.device))) if beat else ()),
                    self.name,
                ),
            )

    def _beat(self) -> None:
        while not self._stopping:
            deadline = time.monotonic() + HEARTBEAT_S
            while not self._stopping and time.monotonic() < deadline:
                time.sleep(0.2)
            try:
                self._record(beat=True)
            except Exception:  # a busy or failing database must not kill the worker
                log.exception("heartbeat of %s not recorded", self.name)

    def stop(self) -> None:
        """Stop beating; safe to call from a signal handler."""
        self._stopping = True

    def stopped(self) -> None:
        """Record the worker's stop, once its heartbeat thread has ended."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join()
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE workers SET stopped_at = ? WHERE name = ?", (time.time(), self.name)
            )


class Worker:
    """Claims inference jobs from the node's database and runs them, one at a time, until
    stopped (the embedded worker: inputs and results in the node's data folder)."""

    def __init__(self, config: NodeConfig, *, name: str | None = None) -> None:
        self.config = config
        self.data_dir = config.store.data_dir.resolve()
        self.db = open_database(config)
        self.jobs = job_store(self.db, priority_aging_s=config.worker.priority_aging_s)
        self.name = name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.runner = Runner(config)
        self.device = self.runner.device
        self.runnable = self.runner.runnable
        self.record = WorkerRecord(self.db, self.name, self.device, self.runner.catalogue)
        self._stopping = False

    def run_job(self, job: Job) -> Attempt:
        # Loaded before the inputs are read: a setup fault (weights that do not fit) is what
        # the job's failure says, whatever the inputs.
        prior = self.runner.algorithm(job.inference.algorithm).inputs.prior
        received_by = self.jobs.completed_at(job)
        inputs = {
            name: series_input(self.db, self.data_dir, uid, received_by)
            for name, uid in job.inference.inputs.items()
            if prior is None or name != prior.role
        }
        if prior is not None and prior.role in job.inference.inputs:
            found = prior_input(self.db, self.data_dir, job.inference.inputs[prior.role])
            if found is not None:
                inputs[prior.role] = found
        return self.runner.run(
            job,
            inputs,
            attempt_folder(self.data_dir, job),
            lambda phase: self.record.progress(job.id, phase),
        )

    def work_once(self) -> Job | None:
        if self.record.doing[0] is not None:  # the job before, whichever way it ended
            self.record.progress(None, None)
        job = self.jobs.claim(
            self.name,
            (JobKind.INFERENCE,),
            algorithms=self.runnable,
            concurrency=self.config.worker.concurrency,
        )
        if job is None:
            return None
        loaded = self.runner.loaded(job.inference.algorithm)
        self.record.progress(job.id, "running" if loaded else "loading")
        try:
            attempt = self.run_job(job)
        except Exception as exc:
            record_failure(
                self.jobs,
                job,
                exc,
                worker=self.name,
                max_attempts=self.config.worker.max_attempts,
                token=job.token,
            )
            return job
        committed = commit_attempt(
            self.db,
            self.jobs,
            job,
            attempt,
            worker=self.name,
            root=self.data_dir,
            device=self.device,
            token=job.token,
        )
        if committed:
            remove_other_attempts(attempt.path.parent)
        else:
            log.warning("job %d was taken from %s while it ran; result dropped", job.id, self.name)
        return job

    def serve(self, poll_s: float = 0.2, *, parent_pid: int | None = None) -> None:
        """Work until stopped, or until the process ``parent_pid`` (the node) is gone."""
        log.info("%s ready on %s", self.name, self.device)
        self.record.register()
        while not self._stopping:
            if parent_pid is not None and os.getppid() != parent_pid:
                # An orphan would go on claiming jobs beside the worker of a restarted node.
                log.warning("%s: the node process is gone; stopping", self.name)
                break
            if self.work_once() is None:
                time.sleep(poll_s)
        self._stopping = True
        self.record.stopped()
        self.db.close()

    def stop(self, *_: object) -> None:
        """Stop after the job in hand; safe to call from a signal handler."""
        self._stopping = True
        self.record.stop()


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


def worker_main(
    config: NodeConfig,
    name: str,
    parent_pid: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Entry of a worker process: started by :class:`WorkerSupervisor` with the node's pid
    as ``parent_pid`` and its own ``environ`` (``CUDA_VISIBLE_DEVICES``: its GPU), or on its
    own by ``dicom-node worker``."""
    # Before anything imports torch: CUDA reads CUDA_VISIBLE_DEVICES once, at its start.
    os.environ.update(environ or {})
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


def visible_gpus(device: str) -> list[str]:
    """The GPUs the worker processes are spread over, as ``CUDA_VISIBLE_DEVICES`` names
    them: none on CPU or for one named device (``cuda:N``, which every process uses); for
    ``auto`` and ``cuda`` each GPU this process sees: on Linux those of the NVIDIA driver
    (``/proc/driver/nvidia/gpus``; none without it), elsewhere torch's count."""
    if device == "cpu" or device.startswith("cuda:"):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    driver = Path("/proc/driver/nvidia/gpus")
    if sys.platform.startswith("linux"):
        # One folder per GPU the driver sees: counted without torch, which must not
        # initialise CUDA in a parent whose children are forked (the cluster worker's).
        return (
            [str(index) for index in range(len(list(driver.iterdir())))] if driver.is_dir() else []
        )
    try:
        import torch
    except ImportError:
        return []
    return [str(index) for index in range(torch.cuda.device_count())]


def worker_environments(config: NodeConfig) -> list[dict[str, str]]:
    """One environment per worker process: ``worker.processes`` of them (unset: one per GPU
    times ``worker.processes_per_gpu`` on a GPU host, else one), each given a GPU in turn."""
    settings = config.worker
    gpus = visible_gpus(settings.device)
    if settings.processes is not None:
        count = settings.processes
    elif gpus:
        count = len(gpus) * settings.processes_per_gpu
    elif settings.device.startswith("cuda:"):
        count = settings.processes_per_gpu
    else:
        count = 1
    if not gpus:
        return [{} for _ in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} for index in range(count)]


def time_limits(config: NodeConfig, registry: Mapping[str, Registration]) -> dict[str, float]:
    """Each installed algorithm's run time limit in seconds: ``worker.time_limits``, else the
    algorithm's own ``time_limit_s``."""
    declared = {
        name: float(r.algorithm.time_limit_s)
        for name, r in registry.items()
        if r.algorithm is not None
    }
    return {**declared, **config.worker.time_limits}


@dataclass
class _Slot:
    """One worker process the supervisor keeps running, and what it knows of it."""

    environ: dict[str, str]
    process: multiprocessing.process.BaseProcess | None = None
    name: str = ""
    restart_at: float | None = None  # monotonic: when to start the next one, after a death
    killed_for: str | None = None  # why the supervisor killed it (its job over its time
    # limit, or cancelled)
    checked_at: float = 0.0  # monotonic: the last look at its job's time limit


class WorkerSupervisor:
    """Keeps ``worker.processes`` worker processes running beside the SCP, kills one whose
    job is over its time limit or was cancelled, and cleans up after one that dies."""

    RESTART_DELAY_S = 1.0
    LIMIT_CHECK_S = 0.5  # how often each worker's job is measured against its time limit

    def __init__(self, config: NodeConfig, jobs: JobStore) -> None:
        self.config = config
        self.jobs = jobs
        self._context = multiprocessing.get_context("spawn")  # no inherited threads or locks
        self._slots = [_Slot(environ) for environ in worker_environments(config)]
        registry = discover()
        self._limits = time_limits(config, registry)
        for key in ("time_limits", "concurrency"):
            unknown = sorted(set(getattr(config.worker, key)) - set(registry))
            if unknown:  # a misspelt name would silently limit nothing
                log.warning("worker.%s names no installed algorithm: %s", key, ", ".join(unknown))
        self._generation = 0
        # A step survives a failing database (the loop logs it once and backs off): a dead
        # worker's job is returned, and a new worker started, when the database answers again.
        self.loop = Loop("worker-supervisor", self.step, 0.2)

    @property
    def names(self) -> list[str]:
        """The names of the current worker processes, one per process kept running."""
        return [slot.name for slot in self._slots]

    @property
    def dead(self) -> int:
        """How many of the worker processes are not alive (dead, or not yet restarted)."""
        return sum(slot.process is None or not slot.process.is_alive() for slot in self._slots)

    def limit(self, algorithm: str) -> float:
        """An algorithm's run time limit in seconds (the plugin API's default if unknown)."""
        return self._limits.get(algorithm, Algorithm.time_limit_s)

    def _spawn(self, slot: _Slot) -> None:
        self._generation += 1
        slot.name = f"worker-{socket.gethostname()}-{os.getpid()}-{self._generation}"
        slot.killed_for = slot.restart_at = None
        slot.process = self._context.Process(
            target=worker_main,
            args=(self.config, slot.name, os.getpid(), slot.environ),
            name=slot.name,
            daemon=True,
        )
        slot.process.start()
        gpu = slot.environ.get("CUDA_VISIBLE_DEVICES")
        log.info(
            "started inference worker %s (pid %d)%s",
            slot.name,
            slot.process.pid,
            f" on GPU {gpu}" if gpu is not None else "",
        )

    def _reap(self, slot: _Slot) -> None:
        assert slot.process is not None
        code = slot.process.exitcode
        cause = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        error = (
            slot.killed_for
            if slot.killed_for is not None
            else f"the worker died ({cause}) while running this job"
        )
        moved = self.jobs.requeue_worker(
            slot.name, error, max_attempts=self.config.worker.max_attempts
        )
        self._mark_stopped(slot.name)
        # A worker killed for a cancelled job returns none: what the operator asked for.
        log.log(
            logging.ERROR if moved or slot.killed_for is None else logging.WARNING,
            "inference worker %s %s; %d job(s) it held returned",
            slot.name,
            f"was killed: its job {slot.killed_for}" if slot.killed_for else f"died ({cause})",
            moved,
        )

    def _mark_stopped(self, name: str) -> None:
        """Record that a dead worker stopped, as a worker that stops in order does itself: the
        API, the dashboard and ``/metrics`` then list only the workers that are there."""
        db = open_database(self.config)
        try:
            with db.transaction() as conn:
                conn.execute(
                    "UPDATE workers SET stopped_at = ? WHERE name = ? AND stopped_at IS NULL",
                    (time.time(), name),
                )
        finally:
            db.close()

    def _must_kill(self, slot: _Slot) -> tuple[int, str] | None:
        """Which job of the slot's worker makes it be killed, and why: it was cancelled while
        it ran (its result would be refused, and the run holds a GPU for nothing), or it has
        run longer than its algorithm's time limit (counted from the claim, loading a model
        the worker had not loaded yet included). Only killing the process stops a CUDA kernel
        or a C extension."""
        for job in self.jobs.cancelled_on(slot.name):
            return job.id, "was cancelled"
        for job in self.jobs.held_by(slot.name):
            limit = self.limit(job.inference.algorithm)
            if job.started_at is not None and time.time() - job.started_at > limit:
                return job.id, f"exceeded its time limit of {limit:g} s (its worker was killed)"
        return None

    def step(self) -> None:
        """One look at every worker process: reap and restart the dead, kill one whose job is
        over its time limit or was cancelled. The step of the supervisor's loop, every
        fraction of a second."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.process is None:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)
                continue
            if not slot.process.is_alive():
                # A cancelled job stays cancelled: the reap returns only the jobs still
                # running (JobStore.requeue_worker), and its results were never recorded.
                self._reap(slot)
                slot.process = None
                # A killed job is no reason to wait: the next job should not.
                slot.restart_at = now + (0.0 if slot.killed_for else self.RESTART_DELAY_S)
                continue
            if now - slot.checked_at >= self.LIMIT_CHECK_S:
                slot.checked_at = now
                found = self._must_kill(slot)
                if found is not None:
                    job_id, why = found
                    log.warning("inference worker %s killed: its job %d %s", slot.name, job_id, why)
                    slot.killed_for = why
                    slot.process.kill()  # SIGKILL: nothing in the job can delay it
                    slot.process.join(10)

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self.loop.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.loop.stop()
        running = [s.process for s in self._slots if s.process is not None]
        for process in running:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker finishes its job, then exits
        deadline = time.monotonic() + timeout_s
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("inference worker did not stop in %.0f s; killing it", timeout_s)
                process.kill()
                process.join()
