"""The running node: wires store, assembler, job store and SCP together, and stops them cleanly.

Start-up order matters for durability: the store clears unacknowledged leftovers and the job
store returns jobs a crash left ``running`` to ``queued`` before the SCP accepts anything (in
cluster mode it does not: remote workers go on with their jobs, and their leases decide).
Shutdown runs in reverse: stop accepting, let in-flight C-STOREs finish, stop the quiet timer,
then close the database.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

from dicom_node import __version__, api
from dicom_node.algorithm import Algorithm
from dicom_node.assembly import Assembler
from dicom_node.audit import AuditTrail
from dicom_node.config import NodeConfig, config_as_yaml
from dicom_node.database import open_reader
from dicom_node.deliver import Deliverer
from dicom_node.events import Events, NodeStarted, NodeStopped
from dicom_node.infer import WorkerSupervisor, time_limits
from dicom_node.jobs import JobKind, job_store, job_store_reading
from dicom_node.loops import Loop, LoopCollector, loops_check
from dicom_node.metrics import WORKER_STALE_S, node_registry
from dicom_node.retention import purge_expired
from dicom_node.retrieve import Retriever
from dicom_node.route import Router
from dicom_node.scp import StorageSCP
from dicom_node.store import InstanceStore
from dicom_node.stow import StowService
from dicom_node.web import CachedProbe, Check, HttpService, cluster_checks, store_check

if TYPE_CHECKING:
    from dicom_node.dispatch import Sweeper

log = logging.getLogger(__name__)


class Node:
    """One dicom-node process."""

    def __init__(self, config: NodeConfig, *, config_source: str = "embedded defaults") -> None:
        self.config = config
        self.config_source = config_source
        self.store = InstanceStore.for_node(config)
        self.registry, counters = node_registry(self.config)
        self.events = Events([counters])
        self.audit = (
            AuditTrail(config.audit, self.store.data_dir, config.scp.ae_title)
            if config.audit.enabled
            else None
        )
        if self.audit is not None:
            self.events.sinks.append(self.audit)
        self.jobs = job_store(self.store.db)
        self.router = Router(
            self.store.data_dir,
            self.store.db,
            config.routing,
            events=self.events,
            algorithm_settings=config.algorithms,
        )
        self.assembler = Assembler(self.store.db, config.assembly, on_complete=self.router.wake)
        self.scp = StorageSCP(config.scp, self.store, self.assembler, self.events)
        # Cluster mode: the workers are Celery workers on GPU hosts, not processes of ours;
        # the sweeper stages and dispatches their jobs (dicom_node.dispatch).
        self.sweeper = self._sweeper() if config.cluster.enabled else None
        if self.sweeper is not None:
            self.router.on_routed = self.sweeper.loop.wake
        self.workers = (
            WorkerSupervisor(config, self.jobs)
            if config.worker.enabled and self.sweeper is None
            else None
        )
        self.deliverer = Deliverer(
            config,
            self.store.db,
            self.store.data_dir,
            events=self.events,
            objects=self.sweeper.objects if self.sweeper is not None else None,
        )
        # Fetching what a study lacks (routing.rules[].fetch_missing). Also without sources: a
        # retrieval queued before its source left the configuration then fails at once, and
        # the study's completions it holds are routed.
        self.retriever = Retriever(config, self.store, events=self.events)
        # In a loop of its own: a slow or failing purge must hold back no delivery.
        self.retention = Loop("retention", self.purge_expired, config.retention.check_every_s)
        self.loops = [
            self.router.loop,
            self.assembler.loop,
            *([self.workers.loop] if self.workers is not None else []),
            *(self.sweeper.loops if self.sweeper is not None else []),
            self.deliverer.loop,
            self.retriever.loop,
            self.retention,
        ]
        self.registry.register(LoopCollector(self.loops))
        self.http = (
            HttpService(
                config,
                self.store.db,
                self.registry,
                self.readiness_checks(),
                self.events,
                stow=StowService(
                    self.store,
                    self.assembler,
                    self.events,
                    config.scp.ae_title,
                    complete_on_request_end=config.dicomweb.complete_on_request_end,
                )
                if config.dicomweb.enabled
                else None,
            )
            if config.http.enabled
            else None
        )
        self._stopped = threading.Event()

    def _sweeper(self) -> Sweeper:
        """Cluster mode's dispatch: the object store (created when missing), the Celery app
        that rings, and each algorithm's time limit as its jobs' hard limit."""
        from dicom_node.dispatch import Sweeper, celery_app, time_limit_warning
        from dicom_node.objects import object_store
        from dicom_node.plugins import discover

        limits = time_limits(self.config, discover())
        warning = time_limit_warning(limits)
        if warning is not None:
            log.warning("%s", warning)
        return Sweeper(
            self.config,
            self.store.db,
            self.jobs,
            self.store.data_dir,
            object_store(self.config.cluster.objects, create=True),
            celery_app(self.config.cluster, []),
            limits,
            Algorithm.time_limit_s,
        )

    def purge_expired(self) -> None:
        """Delete what retention says has done its work (the retention loop's step)."""
        purge_expired(
            self.store.db,
            self.store.data_dir,
            self.config.retention,
            time.time(),
            self.events,
            self.sweeper.objects if self.sweeper is not None else None,
        )

    def readiness_checks(self) -> dict[str, Check]:
        """What must hold for the node to take studies and turn them into results."""

        def index() -> str | None:
            with open_reader(self.config) as conn:
                job_store_reading(conn).counts()
            return None

        def scp() -> str | None:
            return None if self.scp.listening else "the DICOM listener is not running"

        def worker() -> str | None:
            with open_reader(self.config) as conn:
                alive = {w["name"] for w in api.workers(conn) if w["alive"]}
            if self.sweeper is not None:
                # Cluster mode: the workers are other hosts' processes, known by their beats.
                return (
                    None
                    if alive
                    else "no cluster worker has beaten in the last"
                    f" {WORKER_STALE_S:.0f} s (dicom-node worker --cluster on a GPU host)"
                )
            if self.workers is None:
                return None if alive else "no external inference worker has beaten recently"
            if self.workers.dead:
                return (
                    f"{self.workers.dead} of {len(self.workers.names)} inference worker"
                    " process(es) not alive"
                )
            # Alive but not yet beating: it is still discovering its algorithms.
            starting = [name for name in self.workers.names if name not in alive]
            return f"inference worker(s) starting: {', '.join(starting)}" if starting else None

        return {
            "store": store_check(self.store.data_dir, self.config.store.min_free_bytes),
            "index": index if self.sweeper is None else CachedProbe("index", index),
            **(
                cluster_checks(self.config, self.sweeper.objects, self.sweeper.app)
                if self.sweeper is not None
                else {}
            ),
            "scp": scp,
            # In cluster mode both read PostgreSQL over the network: bounded like its probe.
            "worker": worker if self.sweeper is None else CachedProbe("worker", worker),
            "loops": loops_check(self.loops),
        }

    def start(self) -> tuple[str, int]:
        # In cluster mode a running inference job runs on another host, which goes on and
        # commits: its lease, not this restart, decides whether it is taken back. The routing
        # jobs ran here, and nobody else finishes them (found by the cluster crash loop: a
        # study's completion left running by a kill was never routed).
        requeued = self.jobs.requeue_interrupted(
            None if self.sweeper is None else (*Router.KINDS, JobKind.RETRIEVE)
        )
        if requeued:
            log.warning("%d job(s) interrupted by the last stop were queued again", requeued)
        log.info("data under %s", self.store.data_dir)
        self.events.emit(
            NodeStarted(
                __version__,
                self.config.scp.ae_title,
                self.config_source,
                hashlib.sha256(config_as_yaml(self.config).encode()).hexdigest(),
            )
        )
        if self.http is not None:
            try:
                self.http.start()
            except OSError as exc:
                raise OSError(
                    f"http.port {self.config.http.host}:{self.config.http.port}: {exc.strerror}"
                ) from exc
        self.router.start()
        if self.workers is not None:
            self.workers.start()
        for loop in self.sweeper.loops if self.sweeper is not None else []:
            loop.start()
        self.deliverer.start()
        self.retriever.start()
        self.retention.start()
        self.assembler.start()
        try:
            return self.scp.start()
        except OSError as exc:
            raise OSError(
                f"scp.port {self.config.scp.host}:{self.config.scp.port}: {exc.strerror}"
            ) from exc

    def stop(self, grace_s: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping: finishing in-flight associations (up to %.0f s)", grace_s)
        self.scp.stop(grace_s)
        self.assembler.stop()
        self.router.stop()
        if self.workers is not None:
            self.workers.stop()
        for loop in self.sweeper.loops if self.sweeper is not None else []:
            loop.stop()
        self.deliverer.stop()
        self.retriever.stop()
        self.retention.stop()
        if self.http is not None:
            self.http.stop()
        self.events.emit(NodeStopped(__version__, self.config.scp.ae_title))
        if self.audit is not None:
            self.audit.close()
        self.store.close()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down cleanly."""
        wake = threading.Event()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            wake.set()

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            # Timed: a signal the kernel delivers to another thread only sets CPython's flag,
            # and a main thread blocked without a timeout would never run the handler.
            while not wake.wait(0.5):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
