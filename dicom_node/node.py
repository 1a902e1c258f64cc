"""The running node: wires store, assembler, job store and SCP together, and stops them cleanly.

Start-up order matters for durability: the store clears unacknowledged leftovers and the job
store returns jobs a crash left ``running`` to ``queued`` before the SCP accepts anything.
Shutdown runs in reverse: stop accepting, let in-flight C-STOREs finish, stop the quiet timer,
then close the database.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicom_node.assembly import Assembler
from dicom_node.config import NodeConfig
from dicom_node.deliver import Deliverer
from dicom_node.infer import WorkerSupervisor
from dicom_node.jobs import SqliteJobStore
from dicom_node.route import Router
from dicom_node.scp import StorageSCP
from dicom_node.store import InstanceStore

log = logging.getLogger(__name__)


class Node:
    """One dicom-node process."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = InstanceStore.open(
            config.store.data_dir,
            min_free_bytes=config.store.min_free_bytes,
            fsync=config.store.fsync,
        )
        self.jobs = SqliteJobStore(self.store.db)
        self.router = Router(self.store.data_dir, self.store.db, config.routing)
        self.assembler = Assembler(self.store.db, config.assembly, on_complete=self.router.wake)
        self.scp = StorageSCP(config.scp, self.store, self.assembler)
        self.workers = WorkerSupervisor(config, self.jobs) if config.worker.enabled else None
        self.deliverer = Deliverer(config, self.store.db, self.store.data_dir)
        self._stopped = threading.Event()

    def start(self) -> tuple[str, int]:
        requeued = self.jobs.requeue_interrupted()
        if requeued:
            log.warning("%d job(s) interrupted by the last stop were queued again", requeued)
        log.info("data under %s", self.store.data_dir)
        self.router.start()
        if self.workers is not None:
            self.workers.start()
        self.deliverer.start()
        self.assembler.start()
        return self.scp.start()

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
        self.deliverer.stop()
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
            wake.wait()
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
