"""Series and study assembly: deciding when what was received is complete.

DICOM has no "end of series" message, so completeness is inferred. A series is complete when

(a) the association that carried it is released and no instance of it arrived on another
    association that is still open, or
(b) no instance of it arrived for ``series_quiet_seconds``,

whichever comes first; a study completes by the same rules at study level. An instance that
arrives after completion reopens the series (and study), and its next completion is a new event
with the next generation number. Each completion is recorded together with its job in one
transaction, so an event is never lost between the two.

Only which open association carried what lives in memory; everything else is in the database,
so after a restart the quiet timer completes whatever was left open, once it has been quiet for
the quiet time since the restart: the node's downtime is not the sender's silence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from dicom_node.config import AssemblyConfig
from dicom_node.database import Connection, Database
from dicom_node.jobs import CompletionPayload, JobKind, JobStore, job_store
from dicom_node.loops import Loop
from dicom_node.store import StoredInstance

log = logging.getLogger(__name__)


class Trigger(str, Enum):
    RELEASED = "association released"
    QUIET = "quiet timer"


class Level(str, Enum):
    SERIES = "series"
    STUDY = "study"


_TABLES = {
    Level.SERIES: ("series", "series_uid", "series_key", JobKind.SERIES_COMPLETE),
    Level.STUDY: ("studies", "study_uid", "study_key", JobKind.STUDY_COMPLETE),
}


@dataclass(frozen=True)
class Completion:
    level: Level
    uid: str
    key: str
    generation: int
    instances: int
    trigger: Trigger
    latency_s: float  # from the last instance received to this completion
    job_id: int


def _complete(
    conn: Connection,
    jobs: JobStore,
    level: Level,
    uid: str,
    now: float,
    trigger: Trigger,
) -> Completion | None:
    table, uid_column, key_column, kind = _TABLES[level]
    row = conn.execute(
        f"UPDATE {table} SET completed_at = ?, completions = completions + 1"
        f" WHERE {uid_column} = ? AND completed_at IS NULL"
        f" RETURNING completions, last_received, {key_column} AS key",
        (now, uid),
    ).fetchone()
    if row is None:
        return None  # already complete: another trigger got there first
    count_column = "series_uid" if level is Level.SERIES else "study_uid"
    instances = conn.execute(
        f"SELECT COUNT(*) FROM instances WHERE {count_column} = ?", (uid,)
    ).fetchone()[0]
    latency = max(0.0, now - row["last_received"])
    payload = CompletionPayload(level.value, uid, instances, trigger.value, round(latency, 4))
    job_id = jobs.enqueue(conn, kind, uid, row["completions"], payload)
    return Completion(
        level, uid, row["key"], row["completions"], instances, trigger, latency, job_id
    )


class Assembler:
    """Tracks open associations and completes series and studies; thread-safe."""

    def __init__(
        self,
        db: Database,
        config: AssemblyConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_complete: Callable[[Completion], None] | None = None,
    ) -> None:
        self.db = db
        self.jobs = job_store(db)
        self.config = config
        self.clock = clock
        self.on_complete = on_complete
        self._lock = threading.Lock()
        self._carried: dict[int, tuple[set[str], set[str]]] = {}  # assoc -> (series, studies)
        # Silence counts from here at the earliest: while the node was down no sender could
        # go on, and a series cut off by a crash would otherwise complete, partial, the moment
        # the node is back, before its sender can resend the rest.
        self._started_at = clock()
        # A transient database error must not stop assembly: the loop backs off and retries.
        interval = min(0.5, config.series_quiet_seconds / 4, config.study_quiet_seconds / 4)
        self.loop = Loop("assembly-quiet-timer", self._tick, interval)

    # -- events from the SCP -------------------------------------------------------------------

    def association_opened(self, assoc_id: int) -> None:
        with self._lock:
            self._carried[assoc_id] = (set(), set())

    def instance_stored(self, assoc_id: int, stored: StoredInstance) -> None:
        with self._lock:
            series, studies = self._carried.setdefault(assoc_id, (set(), set()))
            series.add(stored.header.series_uid)
            studies.add(stored.header.study_uid)

    def association_ended(self, assoc_id: int, *, released: bool) -> list[Completion]:
        """Forget the association; on a release, complete what only it was carrying.

        An aborted association completes nothing by itself: the sender gave up part-way, so its
        series are left to the quiet timer.
        """
        with self._lock:
            series, studies = self._carried.pop(assoc_id, (set(), set()))
            still_open_series = set().union(*(s for s, _ in self._carried.values()))
            still_open_studies = set().union(*(t for _, t in self._carried.values()))
        if not released:
            return []
        due = [(Level.SERIES, uid) for uid in sorted(series - still_open_series)]
        due += [(Level.STUDY, uid) for uid in sorted(studies - still_open_studies)]
        return self._record(due, Trigger.RELEASED)

    # -- the quiet timer -----------------------------------------------------------------------

    def complete_quiet(self) -> list[Completion]:
        """Complete every open series/study whose last instance is older than its quiet time,
        and that has been quiet that long since this node started."""
        now = self.clock()
        due: list[tuple[Level, str]] = []
        with self.db.reading() as conn:
            for level, quiet in (
                (Level.SERIES, self.config.series_quiet_seconds),
                (Level.STUDY, self.config.study_quiet_seconds),
            ):
                if now - quiet < self._started_at:
                    continue
                table, uid_column, _, _ = _TABLES[level]
                due += [
                    (level, r[0])
                    for r in conn.execute(
                        f"SELECT {uid_column} FROM {table} WHERE completed_at IS NULL"
                        " AND last_received <= ? ORDER BY last_received",
                        (now - quiet,),
                    )
                ]
        return self._record(due, Trigger.QUIET)

    def _record(self, due: list[tuple[Level, str]], trigger: Trigger) -> list[Completion]:
        if not due:
            return []
        now = self.clock()
        with self.db.transaction() as conn:
            done = [
                c
                for level, uid in due
                if (c := _complete(conn, self.jobs, level, uid, now, trigger))
            ]
        for completion in done:
            log.info(
                "%s %s complete (generation %d, %d instances) by %s, %.3f s after its last"
                " instance; job %d queued",
                completion.level.value,
                completion.key[:12],
                completion.generation,
                completion.instances,
                completion.trigger.value,
                completion.latency_s,
                completion.job_id,
            )
            if self.on_complete is not None:
                self.on_complete(completion)
        return done

    def start(self) -> None:
        """Run the quiet timer in a background loop until :meth:`stop`."""
        self.loop.start()

    def _tick(self) -> None:
        self.complete_quiet()

    def stop(self) -> None:
        self.loop.stop()
