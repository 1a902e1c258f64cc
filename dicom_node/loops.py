"""The background loops of ``serve``, each run so that one failure never ends it.

Every long-running loop of the node (the router, the completion quiet timer, the worker
supervisor's watch, the deliverer, retention) is a :class:`Loop`: a named thread that calls
one step, and when the step raises (a locked or briefly unreadable database, a full disk) logs
the reason once, backs off (doubling, capped), tries again, and logs again when a step
succeeds. Without it, one ``database is locked`` ended the router's thread for good with only
a traceback on stderr, and the node went on accepting studies it would never route.

What each loop last did is kept in memory for the node's readiness (a loop backing off makes
``/readyz`` say so, with the reason) and for ``/metrics`` (:class:`LoopCollector`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.database import database_errors
from dicom_node.errors import DicomNodeError
from dicom_node.logs import raised_where
from dicom_node.metrics import PREFIX

log = logging.getLogger(__name__)

# A step says whether there may be more to do at once (True: call it again without waiting,
# as the router does while completions are waiting); None or False: wait for the interval.
Step = Callable[[], bool | None]

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0


def reason(exc: BaseException) -> str:
    """What an operator may read of a loop's failure at ERROR: the message of the node's own
    errors, the database's and the operating system's (they name a lock, a file or a disk,
    never a patient), else the type and the line that raised it, since a library's message
    may quote the data it choked on. PostgreSQL's errors (cluster mode) count as SQLite's:
    :func:`~dicom_node.database.database_errors` names psycopg's only once it is loaded."""
    if isinstance(exc, (*database_errors(), OSError, DicomNodeError)):
        return f"{type(exc).__name__}: {exc}"
    return raised_where(exc)


@dataclass(frozen=True)
class LoopState:
    """Where a loop stands, for readiness and the metrics."""

    name: str
    running: bool
    last_success: float | None  # time.time() of the last step that returned
    failures: int  # steps that raised, since the node started
    backing_off: str | None  # the reason, while the last step raised


class Loop:
    """A named background thread that calls ``step`` every ``interval_s`` (at once again when
    it returns True, or when :meth:`wake` is called) and survives the step's exceptions."""

    def __init__(
        self,
        name: str,
        step: Step,
        interval_s: float,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        if interval_s <= 0 or backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError(
                f"loop {name}: the interval and the backoff are positive, its cap no less"
                " than its start"
            )
        self.name = name
        self.step = step
        self.interval_s = interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_success: float | None = None
        self._failures = 0
        self._streak = 0  # failures in a row
        self._reason: str | None = None

    # -- what readiness and the metrics read ----------------------------------------------------

    @property
    def state(self) -> LoopState:
        with self._lock:
            return LoopState(
                self.name,
                self._thread is not None and self._thread.is_alive(),
                self._last_success,
                self._failures,
                self._reason,
            )

    # -- running ------------------------------------------------------------------------------

    def run_once(self) -> float:
        """Call the step once, catching what it raises; how long to wait before the next call
        (0 when it asked to be called again at once)."""
        try:
            more = self.step()
        except Exception as exc:
            return self._failed(exc)
        with self._lock:
            self._last_success = time.time()
            recovered, self._streak, self._reason = self._reason, 0, None
        if recovered is not None:
            log.warning("%s loop recovered (it had failed: %s)", self.name, recovered)
        return 0.0 if more else self.interval_s

    def _failed(self, exc: Exception) -> float:
        why = reason(exc)
        with self._lock:
            self._failures += 1
            self._streak += 1
            first, self._reason = self._reason is None, why
            wait = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (self._streak - 1))
        if first:  # once per outage: a traceback per try would bury everything else
            log.error(
                "%s loop failed: %s; trying again with backoff (up to %g s), and logging"
                " when it recovers",
                self.name,
                why,
                self.backoff_max_s,
            )
        log.debug("%s loop failed (try %d)", self.name, self._streak, exc_info=exc)
        return wait

    def start(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                wait = self.run_once()
                if wait and self._wake.wait(wait):
                    self._wake.clear()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self, *_: object) -> None:
        """Call the step now rather than after the interval (a completion for the router)."""
        self._wake.set()

    def stopping(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` inside a step; whether the loop is being stopped (for
        steps that must pause between two actions, as the supervisor between a worker's death
        and its replacement)."""
        return self._stop.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def loops_check(loops: Sequence[Loop]) -> Callable[[], str | None]:
    """A readiness check (:mod:`dicom_node.web`): None while every loop runs and its last
    step succeeded, else which loops back off and why."""

    def check() -> str | None:
        problems = []
        for state in (loop.state for loop in loops):
            if state.backing_off is not None:
                since = (
                    "never succeeded"
                    if state.last_success is None
                    else f"last success {time.time() - state.last_success:.0f} s ago"
                )
                problems.append(f"{state.name} backing off ({since}): {state.backing_off}")
            elif not state.running:
                problems.append(f"{state.name} is not running")
        return "; ".join(problems) or None

    return check


class LoopCollector(Collector):
    """``dicom_node_loop_*`` metrics of this process's loops, read at scrape time."""

    def __init__(self, loops: Sequence[Loop], prefix: str = PREFIX) -> None:
        self.loops = loops
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            f"{self.prefix}_loop_last_success_timestamp",
            "When each background loop last completed a step (seconds since the epoch).",
            labels=["loop"],
        )
        failures = CounterMetricFamily(
            f"{self.prefix}_loop_failures",
            "Steps of each background loop that raised, since the node started.",
            labels=["loop"],
        )
        backing_off = GaugeMetricFamily(
            f"{self.prefix}_loop_backing_off",
            "1 while a background loop backs off after a failed step.",
            labels=["loop"],
        )
        for state in (loop.state for loop in self.loops):
            if state.last_success is not None:
                last.add_metric([state.name], state.last_success)
            failures.add_metric([state.name], state.failures)
            backing_off.add_metric([state.name], 0 if state.backing_off is None else 1)
        yield last
        yield failures
        yield backing_off
