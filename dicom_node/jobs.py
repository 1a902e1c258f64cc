"""The durable job queue and the deliveries of its results: the only module that reads or
writes the ``jobs`` and ``deliveries`` tables.

Completion events become jobs that the router and the workers claim and finish; a finished
inference job's results become deliveries that the deliverer sends. Workers touch only this
store and the instance store, never the SCP's memory, so that they can run in other
processes or on other machines. :class:`JobStore` is that seam: :class:`SqliteJobStore` keeps
jobs and deliveries in the node's embedded database, :class:`PostgresJobStore` in cluster
mode's PostgreSQL (the same SQL, with the row locks READ COMMITTED needs), and
:func:`job_store` (:func:`job_store_reading` for readers holding a connection) picks one by
the database's dialect.

A claim gives its attempt a fresh token; only the attempt that still holds the job by its token
commits its results (:meth:`JobStore.holds`). In cluster mode a claim also takes a lease, by the
database's clock, that the worker's heartbeat renews; the node's sweeper takes back the jobs
whose lease ran out (:meth:`JobStore.requeue_expired`), stages queued jobs' inputs to the object
store and rings their doorbells (:meth:`JobStore.unstaged`, :meth:`JobStore.to_dispatch`).

Most operations run in a transaction of their own. The few that must commit together with a
caller's own tables take the caller's connection (``conn``): a completion and its job
(:mod:`dicom_node.assembly`), a routing decision and its jobs (:mod:`dicom_node.route`), a job's
results, its deliveries and its success (:mod:`dicom_node.infer`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from dicom_node.config import SENDER
from dicom_node.database import Connection, Database, Row, over
from dicom_node.priority import DEFAULT_PRIORITY, PRIORITIES, PRIORITY_AGING_S, Priority, rank


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by a person: never claimed again, unless requeued


class JobKind(str, Enum):
    SERIES_COMPLETE = "series-complete"
    STUDY_COMPLETE = "study-complete"
    INFERENCE = "inference"  # one routed algorithm on its inputs
    RETRIEVE = "retrieve"  # series a study lacks, asked of a PACS (dicom_node.retrieve)


class DeliveryState(str, Enum):
    """Where a delivery stands: ``pending`` until the destination confirmed every object
    (waiting for its next attempt after a failure), then ``sent``; ``dead`` when given up,
    until a person replays it."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


LEVELS = ("series", "study")  # what completes, and so what a job's inputs were decided on


def _level(value: object) -> str:
    if value not in LEVELS:
        raise ValueError(f"a job's level is 'series' or 'study', not {value!r}")
    return str(value)


@dataclass(frozen=True)
class CompletionPayload:
    """What a completion job carries: the series or study that completed, and how."""

    level: str  # series or study
    uid: str
    instances: int
    trigger: str  # what completed it (assembly.Trigger's words)
    completion_latency_s: float  # from its last instance received to the completion

    def __post_init__(self) -> None:
        _level(self.level)

    def to_json(self) -> str:
        return json.dumps(
            {
                f"{self.level}_uid": self.uid,
                "instances": self.instances,
                "trigger": self.trigger,
                "completion_latency_s": self.completion_latency_s,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CompletionPayload:
        data = _object(text)
        level = "study" if "study_uid" in data else "series"
        return cls(
            level,
            str(data[f"{level}_uid"]),
            int(data["instances"]),
            str(data["trigger"]),
            float(data["completion_latency_s"]),
        )


@dataclass(frozen=True)
class InferencePayload:
    """What an inference job carries: the routed algorithm, its input series by input name
    (a role, or "series"), and where its results go."""

    algorithm: str
    inputs: Mapping[str, str]  # input name -> series UID
    level: str  # series or study: of the completion it was routed from
    destinations: tuple[str, ...] = ()  # destination names, or "sender"
    senders: tuple[str, ...] = ()  # the calling AEs the inputs came from, for "sender"

    def __post_init__(self) -> None:
        _level(self.level)
        # A copy: the payload is a value, and a caller's dict must not change it afterwards.
        object.__setattr__(self, "inputs", dict(self.inputs))

    def to_json(self) -> str:
        return json.dumps(
            {
                "algorithm": self.algorithm,
                "inputs": dict(self.inputs),
                "level": self.level,
                "destinations": list(self.destinations),
                "senders": list(self.senders),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> InferencePayload:
        data = _object(text)
        inputs = data.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise ValueError(f"an inference job's inputs are an object, not {inputs!r}")
        return cls(
            str(data["algorithm"]),
            {str(name): str(uid) for name, uid in inputs.items()},
            _level(data["level"]),
            tuple(map(str, data.get("destinations") or ())),
            tuple(map(str, data.get("senders") or ())),
        )

    def delivery_targets(self) -> list[tuple[str, str]]:
        """(destination, peer AE) per delivery of the results: 'sender' is one delivery per
        calling AE the inputs came from; any other destination one, with no peer."""
        return [
            (name, peer)
            for name in self.destinations
            for peer in (self.senders if name == SENDER else ("",))
        ]


@dataclass(frozen=True)
class RetrievalPayload:
    """What a retrieval job carries: the source (a name under ``retrieve.sources``) to ask for
    the series of its study (the job's subject) that the index lacks, for which rule's roles,
    and of which modalities (empty: any)."""

    source: str
    algorithm: str  # the rule's, whose roles no received series fits
    roles: tuple[str, ...]
    modalities: tuple[str, ...] = ()
    # A prior instead (its algorithm wants one): the patient's most recent other study made
    # within ``dates`` (a DICOM date range, PS3.4 C.2.2.2.5.1).
    patient_id: str = ""
    issuer: str = ""
    dates: str = ""

    def __post_init__(self) -> None:
        if not self.source or not self.roles:
            raise ValueError("a retrieval names its source and the roles it is for")

    @property
    def prior(self) -> bool:
        return bool(self.patient_id)

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "algorithm": self.algorithm,
                "roles": list(self.roles),
                "modalities": list(self.modalities),
                **(
                    {"patient_id": self.patient_id, "issuer": self.issuer, "dates": self.dates}
                    if self.prior
                    else {}
                ),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RetrievalPayload:
        data = _object(text)
        return cls(
            str(data["source"]),
            str(data["algorithm"]),
            tuple(map(str, data.get("roles") or ())),
            tuple(map(str, data.get("modalities") or ())),
            str(data.get("patient_id") or ""),
            str(data.get("issuer") or ""),
            str(data.get("dates") or ""),
        )


def retrieved_host(job_id: int) -> str:
    """What the index records as ``peer_host`` of an instance a retrieval job fetched (its
    ``calling_aet`` is the source's AE title): retrieved instances are told from pushed ones,
    and by job, by this mark."""
    return f"{RETRIEVED_MARK}{job_id}"


RETRIEVED_MARK = "retrieved:"

JobPayload = CompletionPayload | InferencePayload | RetrievalPayload

# The payload type of each job kind: what enqueue accepts and a stored payload is read as.
_PAYLOADS: dict[JobKind, type[JobPayload]] = {
    JobKind.SERIES_COMPLETE: CompletionPayload,
    JobKind.STUDY_COMPLETE: CompletionPayload,
    JobKind.INFERENCE: InferencePayload,
    JobKind.RETRIEVE: RetrievalPayload,
}


def _object(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a job's payload is a JSON object, not {text[:40]!r}")
    return data


def payload_from_json(kind: str, text: str) -> JobPayload:
    """A stored payload read back as its kind's type."""
    try:
        payload_type = _PAYLOADS[JobKind(kind)]
    except ValueError:
        raise ValueError(f"unknown job kind {kind!r}") from None
    return payload_type.from_json(text)


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    subject_uid: str
    generation: int
    payload: JobPayload
    state: JobState
    attempts: int
    worker: str | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    priority: Priority = DEFAULT_PRIORITY  # the routing rule's class (completions: routine)
    token: str | None = None  # the running attempt's token, fresh at each claim
    lease_until: float | None = None  # the running attempt's lease (database clock), if leased
    staged_at: float | None = None  # its inputs are in the object store (cluster mode)
    dispatched_at: float | None = None  # its doorbell last rung (cluster mode)

    @classmethod
    def from_row(cls, row: Row) -> Job:
        return cls(
            id=row["id"],
            kind=row["kind"],
            subject_uid=row["subject_uid"],
            generation=row["generation"],
            payload=payload_from_json(row["kind"], row["payload"]),
            state=JobState(row["state"]),
            attempts=row["attempts"],
            worker=row["worker"],
            error=row["error"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            priority=PRIORITIES[rank(row["priority"])],
            token=row["attempt_token"],
            lease_until=row["lease_until"],
            staged_at=row["staged_at"],
            dispatched_at=row["dispatched_at"],
        )

    @property
    def inference(self) -> InferencePayload:
        """The payload of an inference job; TypeError for another kind."""
        if not isinstance(self.payload, InferencePayload):
            raise TypeError(f"job {self.id} is a {self.kind} job, not an inference job")
        return self.payload


@dataclass(frozen=True)
class Delivery:
    """One job's results on their way to one destination (and, for 'sender', one peer)."""

    id: int
    job_id: int
    destination: str
    peer_aet: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None

    @classmethod
    def from_row(cls, row: Row) -> Delivery:
        return cls(**{**dict(row), "state": DeliveryState(row["state"])})

    @property
    def label(self) -> str:
        return f"{self.destination} ({self.peer_aet})" if self.peer_aet else self.destination


@dataclass(frozen=True)
class InferenceRecord:
    """An inference job with the times of each step on its way through the node, for the API:
    its study, when what its completion took in was received, when that completed and was
    routed, and when and where its results were written."""

    job: Job
    study_uid: str
    first_received: float | None
    last_received: float | None
    completed_at: float | None  # the completion it was routed from
    routed_at: float | None
    written_at: float | None  # its results recorded
    run_s: float | None
    device: str | None


@dataclass(frozen=True)
class DestinationTally:
    """The deliveries to one destination (and peer, for 'sender'), by state."""

    destination: str
    peer_aet: str
    pending: int
    retrying: int  # pending after at least one failed attempt
    sent: int
    dead: int
    last_sent_at: float | None
    last_error: str | None  # of the newest delivery not sent that has one


@dataclass(frozen=True)
class Activity:
    """What is still open among the jobs of some subjects, and when they last moved."""

    busy: int  # jobs queued or running
    undelivered: int  # deliveries not sent (pending or dead)
    last_sent_at: float | None
    last_finished_at: float | None


@dataclass(frozen=True)
class DispatchTally:
    """Cluster mode's inference jobs between routing and a worker, for the metrics and the
    dashboard: what the sweeper has yet to do, and what no worker has taken."""

    unstaged: int  # queued, inputs not in the object store yet
    staged_unclaimed: int  # queued and staged: rung (or about to be), not claimed by a worker
    leases_expired: int  # running past their lease by the database clock, not yet taken back


@dataclass(frozen=True)
class DeliveryProgress:
    """How far one job's deliveries got: the last one sent, and how many are not sent."""

    last_sent_at: float | None
    open: int


class JobStore(Protocol):
    """What the node, its router, workers and deliverer, and its readers need from the queue.

    Methods taking ``conn`` run in the caller's transaction (or, for reads, on its
    connection); the others run in a transaction of their own.
    """

    # -- jobs --------------------------------------------------------------------------------

    def enqueue(
        self,
        conn: Connection,
        kind: JobKind,
        subject_uid: str,
        generation: int,
        payload: JobPayload,
        priority: Priority = DEFAULT_PRIORITY,
    ) -> int:
        """Queue a job of a priority class inside the caller's transaction; its ID."""
        ...

    def claim(
        self,
        worker: str,
        kinds: Sequence[JobKind] | None = None,
        *,
        algorithms: Collection[str] | None = None,
        concurrency: Mapping[str, int] | None = None,
        lease_s: float | None = None,
        staged_only: bool = False,
    ) -> Job | None:
        """Atomically move the first queued job to ``running`` for ``worker``: the best
        priority class (stat, urgent, routine), a class higher for each aging period it waited,
        then the oldest. Two claims never take the same job, on any database.

        With ``algorithms``, an inference job only for one of them (what the worker can run);
        with ``concurrency``, none of an algorithm already running that many times (counted
        in the same transaction, so two workers cannot both take the last place); with
        ``staged_only``, only a job whose inputs are staged in the object store (cluster mode).

        Every claim gives the attempt a fresh token (``Job.token``): the attempt's proof that it
        still holds the job (:meth:`holds`, :meth:`fail`, :meth:`renew_lease`). With
        ``lease_s`` the attempt holds the job until the database clock passes ``lease_until``
        (now + ``lease_s``, the database's now: the hosts' clocks never compare), unless it
        renews the lease; then :meth:`requeue_expired` takes it back. Without, it holds the job
        until it ends it, or its worker is declared dead (:meth:`requeue_worker`).
        """
        ...

    def claim_retrieval(
        self,
        worker: str,
        *,
        concurrency: Mapping[str, int],
        retry_after: Callable[[int], float],
    ) -> Job | None:
        """Atomically move the best queued retrieval job (claim's order) to ``running`` for
        ``worker``, with a fresh token: only one whose last failed attempt was at least
        ``retry_after(attempts)`` seconds ago (its backoff), whose source runs fewer
        retrievals than its ``concurrency`` limit (1 when unnamed), and whose study no other
        retrieval is running for, so that a study is never fetched twice at once. Counted in
        the claim's transaction: two claims cannot both take the last place."""
        ...

    def held_by(self, worker: str) -> list[Job]:
        """The jobs ``worker`` is running (one, for a worker that takes one at a time)."""
        ...

    def cancelled_on(self, worker: str) -> list[Job]:
        """The cancelled jobs ``worker`` is still running: cancelled while it ran them, and
        its heartbeat (the workers table's ``job_id``) still names them. Their results will be
        refused, so the supervisor kills the worker rather than let it compute on."""
        ...

    def holds(self, conn: Connection, job_id: int, worker: str, token: str | None = None) -> bool:
        """Whether ``worker``'s attempt still holds the job (caller's transaction): it is
        running, for ``worker``, and with ``token``, still the attempt that token was given
        to (the job was not taken back and claimed again meanwhile, even by the same worker).
        True also keeps it so until the caller's transaction ends: a cancel or a lease's
        expiry waits for it, so results committed after a True are never the results of a
        job that was cancelled or queued again meanwhile."""
        ...

    def mark_succeeded(self, conn: Connection, job_id: int) -> None:
        """Close a job inside the caller's transaction, together with what it produced."""
        ...

    def succeed(self, job_id: int) -> None: ...

    def fail(
        self,
        job_id: int,
        error: str,
        *,
        worker: str,
        max_attempts: int,
        token: str | None = None,
    ) -> JobState | None:
        """Record ``worker``'s failed attempt; requeue while attempts remain, else mark failed.
        None when the job is no longer ``worker``'s (queued again and taken by another), or,
        with ``token``, no longer that attempt's."""
        ...

    def renew_lease(self, job_id: int, token: str, lease_s: float) -> bool:
        """Extend the attempt's lease to the database clock's now + ``lease_s`` (a worker's
        heartbeat); False when the attempt lost the job (its lease ran out and the job was
        taken back, it was cancelled or ended): the worker should stop, its result would be
        refused."""
        ...

    def requeue_expired(self, *, max_attempts: int) -> list[int]:
        """Take back the running jobs whose lease ran out by the database clock (their
        worker died, froze or lost the database): queued again for another attempt, or failed
        when they had ``max_attempts``. Their IDs. Jobs claimed without a lease never expire."""
        ...

    # -- cluster mode: staging and dispatch (the sweeper's bookkeeping) ------------------------

    def unstaged(self, limit: int = 100) -> list[Job]:
        """Queued inference jobs whose inputs are not staged yet, oldest first."""
        ...

    def mark_staged(self, job_id: int) -> None:
        """Record that a job's inputs and manifest are in the object store (now, by the
        database clock): from here it may be dispatched and claimed (``staged_only``)."""
        ...

    def to_dispatch(self, *, redispatch_s: float, limit: int = 500) -> list[Job]:
        """Queued, staged inference jobs whose doorbell was never rung, or rung more than
        ``redispatch_s`` ago by the database clock and not claimed since (the message was lost
        or the worker that took it died): what the sweeper publishes, best claim first."""
        ...

    def mark_dispatched(self, job_ids: Sequence[int]) -> None:
        """Record that the jobs' doorbells were rung (now, by the database clock)."""
        ...

    def dispatch_tally(self) -> DispatchTally:
        """How many inference jobs are unstaged, staged but not claimed, and running past
        their lease (by the database clock), in one statement."""
        ...

    def requeue_interrupted(self, kinds: Sequence[JobKind] | None = None) -> int:
        """Return jobs left ``running`` by a crash to ``queued`` (those of ``kinds`` only,
        when given); the count moved. In cluster mode a node takes back only the kinds it
        runs in its own process (routing): its inference jobs' workers are elsewhere and go
        on, and their leases decide (:meth:`requeue_expired`)."""
        ...

    def requeue_worker(self, worker: str, error: str, *, max_attempts: int) -> int:
        """Return the jobs a dead worker held; those out of attempts fail. The count moved."""
        ...

    def cancel(self, job_id: int, by: str) -> Job | None:
        """Cancel a queued or running job for ``by`` (who asked); the job as it was before,
        None when there is no such job or it has ended. A cancelled job is never claimed, and
        a running one is no longer held by its worker, so the worker's result is refused
        (:meth:`holds`); its ``worker`` is kept, to say which worker was running it."""
        ...

    def fail_queued(self, job_id: int, error: str) -> Job | None:
        """Fail a queued job that no attempt can ever run (cluster mode: its inputs are gone
        before it could be staged); the job as it was, None when it is not queued. A person's
        :meth:`requeue` queues it again, to be staged again."""
        ...

    def requeue(self, job_id: int, by: str) -> Job | None:
        """Queue a failed or cancelled job again, with all its attempts, for ``by``; the job
        as it was before, None when there is no such job or it is not failed or cancelled (a
        succeeded job's results are redelivered with :meth:`replay_deliveries`, not rerun)."""
        ...

    def get(self, job_id: int) -> Job | None: ...

    def recent(
        self, kind: JobKind, *, limit: int | None = None, subject_uids: Sequence[str] | None = None
    ) -> list[Job]:
        """The newest jobs of a kind, newest first (all of them without ``limit``); only those
        of ``subject_uids`` if given."""
        ...

    def completed_at(self, job: Job) -> float | None:
        """When the completion an inference job was routed from was recorded."""
        ...

    def counts(self) -> dict[JobState, int]: ...

    def tally(self) -> list[tuple[str, JobState, Priority, int]]:
        """How many jobs of each kind and priority class are in each state."""
        ...

    def inference_records(
        self,
        *,
        job_id: int | None = None,
        study_uid: str | None = None,
        state: JobState | None = None,
        limit: int = 1000,
    ) -> list[InferenceRecord]:
        """Inference jobs with their steps' times, newest first."""
        ...

    def study_tallies(
        self, study_uids: Sequence[str]
    ) -> tuple[dict[tuple[str, JobState], int], dict[tuple[str, DeliveryState], int]]:
        """Per study and state: its inference jobs, and their deliveries."""
        ...

    def activity(self, subject_uids: Sequence[str]) -> Activity:
        """What is open among the jobs of these series and studies."""
        ...

    # -- deliveries --------------------------------------------------------------------------

    def schedule_deliveries(self, conn: Connection, job_id: int, payload: InferencePayload) -> int:
        """Queue one delivery per target of a job's route (caller's transaction); how many."""
        ...

    def due_deliveries(self, now: float) -> list[Delivery]: ...

    def delivery_sent(self, delivery_id: int, at: float) -> None: ...

    def delivery_failed(
        self, delivery_id: int, *, attempts: int, error: str, dead: bool, next_attempt_at: float
    ) -> None: ...

    def replay_deliveries(self, *, job_id: int | None = None, all_dead: bool = False) -> int:
        """Make dead (or, for one job, also pending) deliveries due now with fresh attempts."""
        ...

    def deliveries_of(self, job_ids: Sequence[int]) -> dict[int, list[Delivery]]: ...

    def deliveries(
        self, *, state: DeliveryState | None = None, limit: int = 200
    ) -> list[Delivery]: ...

    def delivery_counts(self) -> dict[DeliveryState, int]: ...

    def delivery_tally(self) -> list[tuple[str, DeliveryState, int]]:
        """How many deliveries to each destination are in each state."""
        ...

    def destinations(self) -> list[DestinationTally]: ...

    def delivery_progress(self, job_ids: Sequence[int]) -> dict[int, DeliveryProgress]: ...


# The job is running, in the hands of the given worker: a node restart queues running jobs
# again, so an attempt may go on after another worker took the job.
_HELD = "id = ? AND state = 'running' AND worker = ?"


# An attempt's bookkeeping, cleared when the job is queued again: the next claim gives a new
# token and lease, and the sweeper rings its doorbell again at once.
_NO_ATTEMPT = "attempt_token = NULL, lease_until = NULL, dispatched_at = NULL"


def _held(worker: str, token: str | None) -> tuple[str, tuple[object, ...]]:
    """The condition that an attempt holds the job (id, then these parameters): by its
    worker, and by its token when it has one (the worker may have claimed the job again)."""
    if token is None:
        return _HELD, (worker,)
    return _HELD + " AND attempt_token = ?", (worker, token)


# The study a job belongs to: its subject is a study, or a series of one.
_JOB_STUDY = (
    "COALESCE((SELECT s.study_uid FROM series s WHERE s.series_uid = j.subject_uid), j.subject_uid)"
)


def _received(aggregate: str) -> str:
    """When the instances a job's completion took in arrived (MIN or MAX): those of its own
    series or study (by its level) received after the completion before it and by its own.
    The index keeps each instance's latest copy only: a resend moves its copies to the later
    completion, and an earlier one whose copies were all replaced has none (NULL)."""
    window = (
        " AND i.received_at <= COALESCE(c.created_at, j.created_at)"
        " AND i.received_at > COALESCE(prev.created_at, 0)"
    )
    return (
        "CASE json_extract(j.payload, '$.level')"
        f" WHEN 'study' THEN (SELECT {aggregate}(i.received_at) FROM instances i"
        f"   WHERE i.study_uid = j.subject_uid{window})"
        f" ELSE (SELECT {aggregate}(i.received_at) FROM instances i"
        f"   WHERE i.series_uid = j.subject_uid{window}) END"
    )


_ALGORITHM = "json_extract({}.payload, '$.algorithm')"


def _claim_filter(
    algorithms: Collection[str] | None, concurrency: Mapping[str, int] | None
) -> tuple[str, list[object]]:
    """The claim's conditions on a queued job ``q`` beyond its state and kind: an inference
    job of one of ``algorithms`` (other kinds pass), and one whose algorithm runs fewer
    times than its ``concurrency`` limit (one without a limit passes)."""
    where, params = "", list[object]()
    if algorithms is not None:
        where += (
            f" AND (q.kind != '{JobKind.INFERENCE.value}'"
            f" OR {_ALGORITHM.format('q')} IN (SELECT value FROM json_each(?)))"
        )
        params.append(_json_list(algorithms))
    if concurrency:
        # No limit for the algorithm (or not an inference job) compares as NULL: passes.
        # The limit is CAST: PostgreSQL's json_each gives its values as text.
        where += (
            " AND COALESCE((SELECT COUNT(*) FROM jobs r WHERE r.state = 'running'"
            f" AND r.kind = '{JobKind.INFERENCE.value}'"
            f" AND {_ALGORITHM.format('r')} = {_ALGORITHM.format('q')})"
            f" < (SELECT CAST(value AS INTEGER) FROM json_each(?)"
            f" WHERE key = {_ALGORITHM.format('q')} AND q.kind = '{JobKind.INFERENCE.value}'),"
            " TRUE)"
        )
        params.append(json.dumps(dict(concurrency)))
    return where, params


def _json_list(values: Iterable[object]) -> str:
    """Values as one JSON parameter (``IN (SELECT value FROM json_each(?))``): any number of
    them is one bound variable, under SQLite's limit however many there are."""
    return json.dumps(list(values))


def _claim_order(aging_s: float) -> tuple[str, int]:
    """The ORDER BY of a claim, and how many times it takes the claim's time as a parameter:
    the class's rank (0 stat, 1 urgent, 2 routine) less one for each ``aging_s`` the job has
    waited, never better than stat; then the oldest, then the first queued.

    Written with comparisons only, so that both databases order alike: PostgreSQL's CAST of a
    fraction to an integer rounds where SQLite's truncates, and scalar MAX(a, b) is SQLite's
    alone. A job aged as many periods as there are classes below stat is stat whatever its
    class, so that many comparisons are all it takes."""
    ranks = " ".join(f"WHEN '{p}' THEN {rank(p)}" for p in PRIORITIES)
    class_rank = f"(CASE priority {ranks} ELSE {rank(DEFAULT_PRIORITY)} END)"
    periods = range(len(PRIORITIES) - 1, 0, -1)
    aged = " ".join(
        f"WHEN ? - created_at >= {float(n * aging_s)!r}"
        f" THEN CASE WHEN {class_rank} > {n} THEN {class_rank} - {n} ELSE 0 END"
        for n in periods
    )
    return f"CASE {aged} ELSE {class_rank} END, created_at, id", len(periods)


class SqliteJobStore:
    """:class:`JobStore` on the node's SQLite database (safe across processes), in SQL that
    PostgreSQL runs too (:class:`PostgresJobStore` adds the row locks its isolation needs).

    ``aging_s`` is ``worker.priority_aging_s``; ``clock`` stamps a job queued and is the claim's
    "now" (a test's explicit times instead of sleeps). Leases, staging and dispatch times are
    the database's clock instead (``db.dialect.now``): the one clock every host shares.
    """

    # What a statement that reads a row to change it adds to lock the row for the rest of its
    # transaction. SQLite needs none: a transaction that writes holds the database's one
    # write lock from its start (BEGIN IMMEDIATE).
    _LOCK_ROW = ""

    def __init__(
        self,
        db: Database,
        *,
        aging_s: float = PRIORITY_AGING_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(aging_s) and aging_s > 0):
            raise ValueError(f"the priority aging time is positive, not {aging_s!r}")
        self.db = db
        self.clock = clock
        self._order, self._order_times = _claim_order(aging_s)

    @property
    def _now(self) -> str:
        """The database clock in epoch seconds, as an SQL expression."""
        return self.db.dialect.now

    # -- jobs --------------------------------------------------------------------------------

    def enqueue(
        self,
        conn: Connection,
        kind: JobKind,
        subject_uid: str,
        generation: int,
        payload: JobPayload,
        priority: Priority = DEFAULT_PRIORITY,
    ) -> int:
        """Insert a queued job inside the caller's transaction.

        Callers that record an event (a series completing) enqueue in the same transaction, so
        an event is never recorded without its job, nor a job without its event.
        """
        kind = JobKind(kind)
        expected = _PAYLOADS[kind]
        if not isinstance(payload, expected):
            raise TypeError(f"a {kind.value} job carries a {expected.__name__}")
        row = conn.execute(
            "INSERT INTO jobs (kind, subject_uid, generation, payload, state, created_at,"
            " priority) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                kind.value,
                subject_uid,
                generation,
                payload.to_json(),
                JobState.QUEUED.value,
                self.clock(),
                PRIORITIES[rank(priority)],
            ),
        ).fetchone()
        return int(row[0])

    def claim(
        self,
        worker: str,
        kinds: Sequence[JobKind] | None = None,
        *,
        algorithms: Collection[str] | None = None,
        concurrency: Mapping[str, int] | None = None,
        lease_s: float | None = None,
        staged_only: bool = False,
    ) -> Job | None:
        if lease_s is not None and not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"a claim's lease is a positive number of seconds, not {lease_s!r}")
        where = "state = 'queued'"
        params: list[Any] = []
        if kinds:
            where += f" AND kind IN ({','.join('?' * len(kinds))})"
            params.extend(JobKind(k).value for k in kinds)
        if staged_only:
            where += " AND staged_at IS NOT NULL"
        # A study's completions (its own, its series') wait while a retrieval for the study
        # is open: what it fetches (a missing series, a prior) is for the decision to see
        # (dicom_node.retrieve).
        where += (
            f" AND NOT (q.kind IN ('{JobKind.STUDY_COMPLETE.value}',"
            f" '{JobKind.SERIES_COMPLETE.value}') AND EXISTS (SELECT 1"
            f" FROM jobs r WHERE r.kind = '{JobKind.RETRIEVE.value}'"
            " AND r.state IN ('queued', 'running') AND r.subject_uid IN (q.subject_uid,"
            " (SELECT s.study_uid FROM series s WHERE s.series_uid = q.subject_uid))))"
        )
        where_more, more = _claim_filter(algorithms, concurrency)
        where, params = where + where_more, [*params, *more]
        lease = "NULL" if lease_s is None else f"{self._now} + ?"
        # One statement chooses and takes: atomic across workers, processes and hosts.
        with self.db.transaction() as conn:
            self._serialize_claim(conn, limited=bool(concurrency))
            now = self.clock()  # the aging's now
            taken = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?,"
                f" attempt_token = ?, lease_until = {lease}"
                f" WHERE id = (SELECT id FROM jobs q WHERE {where}"
                # PostgreSQL: FOR UPDATE SKIP LOCKED (see PostgresJobStore); SQLite: none, its
                # claims take turns at the write lock and no job is ever being taken.
                f" ORDER BY {self._order} LIMIT 1{self.db.dialect.lock_skip}) RETURNING id",
                (
                    worker,
                    uuid.uuid4().hex,
                    *(() if lease_s is None else (lease_s,)),
                    *params,
                    *(now,) * self._order_times,
                ),
            ).fetchone()
            if taken is None:
                return None
            # Its start is read once taken: a job whose end this claim saw (the one before
            # under a concurrency limit) then ends before this one starts, also in the record.
            # On PostgreSQL that end is no claim and waits for no lock: it may commit after a
            # time read before the claim's statement, and before the statement looks.
            row = conn.execute(
                "UPDATE jobs SET started_at = ? WHERE id = ? RETURNING *",
                (self.clock(), taken["id"]),
            ).fetchone()
        return Job.from_row(row)

    def _serialize_claim(self, conn: Connection, *, limited: bool) -> None:
        """Make a claim wait for the claims before it where the database does not already
        (SQLite: every write transaction waits for the one before)."""

    def claim_retrieval(
        self,
        worker: str,
        *,
        concurrency: Mapping[str, int],
        retry_after: Callable[[int], float],
    ) -> Job | None:
        # Polled by every node: a read first, so that an idle one takes no write lock.
        with self.db.reading() as conn:
            waiting = conn.execute(
                "SELECT 1 FROM jobs WHERE state = 'queued' AND kind = ? LIMIT 1",
                (JobKind.RETRIEVE.value,),
            ).fetchone()
        if waiting is None:
            return None
        # Few retrievals are ever open at once: they are read and chosen here, in the
        # transaction that takes the chosen one (serialized like a limited claim).
        with self.db.transaction() as conn:
            self._serialize_claim(conn, limited=True)
            now = self.clock()
            rows = conn.execute(
                "SELECT id, subject_uid, state, attempts, finished_at,"
                " json_extract(payload, '$.source') AS source FROM jobs"
                " WHERE kind = ? AND state IN ('queued', 'running')"
                f" ORDER BY {self._order}",
                (JobKind.RETRIEVE.value, *(now,) * self._order_times),
            ).fetchall()
            running = [r for r in rows if r["state"] == JobState.RUNNING.value]
            busy_studies = {r["subject_uid"] for r in running}
            by_source = Counter(str(r["source"]) for r in running)
            chosen = next(
                (
                    r
                    for r in rows
                    if r["state"] == JobState.QUEUED.value
                    and r["subject_uid"] not in busy_studies
                    and by_source[str(r["source"])] < concurrency.get(str(r["source"]), 1)
                    and (
                        r["finished_at"] is None
                        or r["attempts"] == 0
                        or now >= r["finished_at"] + retry_after(int(r["attempts"]))
                    )
                ),
                None,
            )
            if chosen is None:
                return None
            row = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?,"
                " attempt_token = ?, started_at = ? WHERE id = ? AND state = 'queued'"
                " RETURNING *",
                (worker, uuid.uuid4().hex, self.clock(), chosen["id"]),
            ).fetchone()
        return None if row is None else Job.from_row(row)

    def held_by(self, worker: str) -> list[Job]:
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'running' AND worker = ? ORDER BY id", (worker,)
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def cancelled_on(self, worker: str) -> list[Job]:
        # Both columns: the job's worker says who ran it (a cancelled job keeps it), the
        # worker's job_id that it is still on it (a worker that ended the run, its result
        # refused, has gone on to another job or to none).
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT jobs.* FROM jobs JOIN workers ON workers.job_id = jobs.id"
                " WHERE jobs.state = 'cancelled' AND jobs.worker = ? AND workers.name = ?"
                " AND workers.stopped_at IS NULL ORDER BY jobs.id",
                (worker, worker),
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def holds(self, conn: Connection, job_id: int, worker: str, token: str | None = None) -> bool:
        held, params = _held(worker, token)
        # Locked (PostgreSQL): the caller commits the attempt's results next, and a cancel
        # or an expiry between this read and that commit would be overwritten by it.
        row = conn.execute(
            f"SELECT 1 FROM jobs WHERE {held}{self._LOCK_ROW}", (job_id, *params)
        ).fetchone()
        return row is not None

    def mark_succeeded(self, conn: Connection, job_id: int) -> None:
        conn.execute(
            "UPDATE jobs SET state = 'succeeded', error = NULL, finished_at = ?,"
            " lease_until = NULL WHERE id = ?",
            (time.time(), job_id),
        )

    def succeed(self, job_id: int) -> None:
        with self.db.transaction() as conn:
            self.mark_succeeded(conn, job_id)

    def fail(
        self,
        job_id: int,
        error: str,
        *,
        worker: str,
        max_attempts: int,
        token: str | None = None,
    ) -> JobState | None:
        held, params = _held(worker, token)
        with self.db.transaction() as conn:
            # Only the attempt that holds the job ends it: a late failure of an attempt that
            # lost the job (its node restarted, its lease ran out) must not requeue another
            # worker's attempt.
            ended = _end_attempts(conn, held, (job_id, *params), error, max_attempts)
        return ended[0][1] if ended else None

    def renew_lease(self, job_id: int, token: str, lease_s: float) -> bool:
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"a lease is a positive number of seconds, not {lease_s!r}")
        with self.db.transaction() as conn:
            # By the token alone: it is the attempt's, whichever worker's name it runs under.
            # A lease already past but not yet taken back is still this attempt's to renew.
            row = conn.execute(
                f"UPDATE jobs SET lease_until = {self._now} + ? WHERE id = ?"
                " AND state = 'running' AND attempt_token = ? RETURNING id",
                (lease_s, job_id, token),
            ).fetchone()
        return row is not None

    def requeue_expired(self, *, max_attempts: int) -> list[int]:
        with self.db.transaction() as conn:
            ended = _end_attempts(
                conn,
                f"state = 'running' AND lease_until < {self._now}",
                (),
                "lease expired: its worker stopped renewing it (died, froze or lost the database)",
                max_attempts,
            )
        return sorted(job_id for job_id, _ in ended)

    def requeue_interrupted(self, kinds: Sequence[JobKind] | None = None) -> int:
        only = "" if kinds is None else f" AND kind IN ({', '.join('?' * len(kinds))})"
        with self.db.transaction() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET state = 'queued', worker = NULL, {_NO_ATTEMPT},"
                " error = 'interrupted: the node stopped while this job ran'"
                f" WHERE state = 'running'{only}",
                tuple(kind.value for kind in kinds or ()),
            )
        return cursor.rowcount

    def requeue_worker(self, worker: str, error: str, *, max_attempts: int) -> int:
        with self.db.transaction() as conn:
            where = "state = 'running' AND worker = ?"
            return len(_end_attempts(conn, where, (worker,), error, max_attempts))

    def cancel(self, job_id: int, by: str) -> Job | None:
        return self._change(
            job_id,
            (JobState.QUEUED, JobState.RUNNING),
            "state = 'cancelled', finished_at = ?, lease_until = NULL,"
            " error = 'cancelled by ' || ? || CASE state WHEN 'running' THEN ' while it ran'"
            " ELSE '' END",
            (time.time(), by),
        )

    def fail_queued(self, job_id: int, error: str) -> Job | None:
        return self._change(
            job_id,
            (JobState.QUEUED,),
            "state = 'failed', finished_at = ?, error = ?",
            (time.time(), error),
        )

    def requeue(self, job_id: int, by: str) -> Job | None:
        return self._change(
            job_id,
            (JobState.FAILED, JobState.CANCELLED),
            f"state = 'queued', attempts = 0, worker = NULL, {_NO_ATTEMPT}, started_at = NULL,"
            " finished_at = NULL, error = 'requeued by ' || ? || ' after: ' || COALESCE(error, '')",
            (by,),
        )

    def _change(
        self, job_id: int, states: Sequence[JobState], assignments: str, params: Sequence[object]
    ) -> Job | None:
        """Change a job in one of ``states``; the job as it was, or None."""
        allowed = ", ".join(f"'{s.value}'" for s in states)
        with self.db.transaction() as conn:
            # Locked (PostgreSQL) from the read to the change: a worker committing the job's
            # success between them would otherwise have it cancelled after it succeeded.
            row = conn.execute(
                f"SELECT * FROM jobs WHERE id = ? AND state IN ({allowed}){self._LOCK_ROW}",
                (job_id,),
            ).fetchone()
            if row is not None:
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*params, job_id))
        return Job.from_row(row) if row is not None else None

    # -- cluster mode: staging and dispatch --------------------------------------------------

    def unstaged(self, limit: int = 100) -> list[Job]:
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND kind = ? AND staged_at IS NULL"
                " ORDER BY created_at, id LIMIT ?",
                (JobKind.INFERENCE.value, limit),
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def mark_staged(self, job_id: int) -> None:
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE jobs SET staged_at = {self._now} WHERE id = ?", (job_id,))

    def to_dispatch(self, *, redispatch_s: float, limit: int = 500) -> list[Job]:
        if not (math.isfinite(redispatch_s) and redispatch_s > 0):
            raise ValueError(f"the redispatch time is positive, not {redispatch_s!r}")
        now = self.clock()
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND kind = ?"
                " AND staged_at IS NOT NULL"
                f" AND (dispatched_at IS NULL OR dispatched_at < {self._now} - ?)"
                f" ORDER BY {self._order} LIMIT ?",
                (JobKind.INFERENCE.value, redispatch_s, *(now,) * self._order_times, limit),
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def mark_dispatched(self, job_ids: Sequence[int]) -> None:
        if not job_ids:
            return
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE jobs SET dispatched_at = {self._now}"
                " WHERE id IN (SELECT CAST(value AS INTEGER) FROM json_each(?))",
                (_json_list(job_ids),),
            )

    def dispatch_tally(self) -> DispatchTally:
        with self.db.reading() as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN state = 'queued' AND staged_at IS NULL"
                " THEN 1 ELSE 0 END), 0),"
                " COALESCE(SUM(CASE WHEN state = 'queued' AND staged_at IS NOT NULL"
                " THEN 1 ELSE 0 END), 0),"
                f" COALESCE(SUM(CASE WHEN state = 'running' AND lease_until < {self._now}"
                " THEN 1 ELSE 0 END), 0)"
                " FROM jobs WHERE kind = ? AND state IN ('queued', 'running')",
                (JobKind.INFERENCE.value,),
            ).fetchone()
        return DispatchTally(int(row[0]), int(row[1]), int(row[2]))

    # -- reading -----------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        with self.db.reading() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row is not None else None

    def recent(
        self, kind: JobKind, *, limit: int | None = None, subject_uids: Sequence[str] | None = None
    ) -> list[Job]:
        where, params = "kind = ?", list[object]([kind.value])
        if subject_uids is not None:
            where += " AND subject_uid IN (SELECT value FROM json_each(?))"
            params.append(_json_list(subject_uids))
        if limit is not None:
            where, params = f"{where} ORDER BY id DESC LIMIT ?", [*params, limit]
        else:
            where += " ORDER BY id DESC"
        with self.db.reading() as conn:
            rows = conn.execute(f"SELECT * FROM jobs WHERE {where}", params).fetchall()
        return [Job.from_row(r) for r in rows]

    def completed_at(self, job: Job) -> float | None:
        """When the completion an inference job was routed from was recorded (one transaction
        with the completion, :mod:`dicom_node.assembly`); None for a job without one."""
        level = job.inference.level
        kind = JobKind.STUDY_COMPLETE if level == "study" else JobKind.SERIES_COMPLETE
        with self.db.reading() as conn:
            row = conn.execute(
                "SELECT created_at FROM jobs WHERE subject_uid = ? AND generation = ? AND kind = ?",
                (job.subject_uid, job.generation, kind.value),
            ).fetchone()
        return None if row is None else float(row["created_at"])

    def counts(self) -> dict[JobState, int]:
        with self.db.reading() as conn:
            rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        counts = {state: 0 for state in JobState}
        counts.update({JobState(r["state"]): r["n"] for r in rows})
        return counts

    def tally(self) -> list[tuple[str, JobState, Priority, int]]:
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT kind, state, priority, COUNT(*) FROM jobs GROUP BY kind, state, priority"
            ).fetchall()
        return [
            (kind, JobState(state), PRIORITIES[rank(priority)], count)
            for kind, state, priority, count in rows
        ]

    def inference_records(
        self,
        *,
        job_id: int | None = None,
        study_uid: str | None = None,
        state: JobState | None = None,
        limit: int = 1000,
    ) -> list[InferenceRecord]:
        where, params = "WHERE j.kind = 'inference'", list[object]()
        if job_id is not None:
            where, params = where + " AND j.id = ?", [*params, job_id]
        if study_uid is not None:
            where, params = where + f" AND {_JOB_STUDY} = ?", [*params, study_uid]
        if state is not None:
            where, params = where + " AND j.state = ?", [*params, state.value]
        # The completion a job was routed from is of its level: a series and its study may
        # share a UID (and so a subject and a generation), and a job joined to both was
        # listed twice.
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT j.*, " + _JOB_STUDY + " AS study_uid,"
                " r.created_at AS written_at, r.run_s, r.device,"
                " c.created_at AS completed_at, c.finished_at AS routed_at,"
                f" {_received('MIN')} AS first_received, {_received('MAX')} AS last_received"
                " FROM jobs j LEFT JOIN results r ON r.job_id = j.id"
                " LEFT JOIN jobs c ON c.subject_uid = j.subject_uid"
                "   AND c.generation = j.generation"
                "   AND c.kind = CASE json_extract(j.payload, '$.level')"
                f"     WHEN 'study' THEN '{JobKind.STUDY_COMPLETE.value}'"
                f"     ELSE '{JobKind.SERIES_COMPLETE.value}' END"
                # Completions are counted one by one (assembly): the one before is
                # generation - 1.
                " LEFT JOIN jobs prev ON prev.subject_uid = c.subject_uid"
                "   AND prev.kind = c.kind AND prev.generation = c.generation - 1"
                f" {where} ORDER BY j.id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [
            InferenceRecord(
                Job.from_row(r),
                r["study_uid"],
                r["first_received"],
                r["last_received"],
                r["completed_at"],
                r["routed_at"],
                r["written_at"],
                r["run_s"],
                r["device"],
            )
            for r in rows
        ]

    def study_tallies(
        self, study_uids: Sequence[str]
    ) -> tuple[dict[tuple[str, JobState], int], dict[tuple[str, DeliveryState], int]]:
        # The inference jobs of the listed studies, as a table both counts read.
        listed = (
            "WITH _inference AS (SELECT j.id, j.state, " + _JOB_STUDY + " AS study_uid"
            "   FROM jobs j WHERE j.kind = 'inference'),"
            " _listed_jobs AS (SELECT * FROM _inference"
            "   WHERE study_uid IN (SELECT value FROM json_each(?))) "
        )
        uids = _json_list(study_uids)
        with self.db.reading() as conn:
            job_rows = conn.execute(
                listed
                + "SELECT study_uid, state, COUNT(*) FROM _listed_jobs GROUP BY study_uid, state",
                (uids,),
            ).fetchall()
            delivery_rows = conn.execute(
                listed + "SELECT j.study_uid, d.state, COUNT(*) FROM _listed_jobs j"
                " JOIN deliveries d ON d.job_id = j.id GROUP BY j.study_uid, d.state",
                (uids,),
            ).fetchall()
        return (
            {(uid, JobState(state)): count for uid, state, count in job_rows},
            {(uid, DeliveryState(state)): count for uid, state, count in delivery_rows},
        )

    def activity(self, subject_uids: Sequence[str]) -> Activity:
        subjects = "SELECT value FROM json_each(?)"
        with self.db.reading() as conn:
            row = conn.execute(
                f"SELECT (SELECT COUNT(*) FROM jobs WHERE subject_uid IN ({subjects})"
                "   AND state IN ('queued', 'running')) AS busy,"
                " (SELECT COUNT(*) FROM deliveries d JOIN jobs j ON j.id = d.job_id"
                f"   WHERE j.subject_uid IN ({subjects}) AND d.state != 'sent') AS undelivered,"
                " (SELECT MAX(d.sent_at) FROM deliveries d JOIN jobs j ON j.id = d.job_id"
                f"   WHERE j.subject_uid IN ({subjects})) AS sent_at,"
                f" (SELECT MAX(finished_at) FROM jobs WHERE subject_uid IN ({subjects}))"
                " AS finished",
                (_json_list(subject_uids),) * 4,
            ).fetchone()
        return Activity(row["busy"], row["undelivered"], row["sent_at"], row["finished"])

    # -- deliveries --------------------------------------------------------------------------

    def schedule_deliveries(self, conn: Connection, job_id: int, payload: InferencePayload) -> int:
        """Queue one delivery per target of a job's route, inside the caller's transaction
        (the one that records the job's results, so none is ever lost)."""
        rows = payload.delivery_targets()
        now = time.time()
        conn.executemany(
            "INSERT INTO deliveries (job_id, destination, peer_aet, state,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [(job_id, name, peer, DeliveryState.PENDING.value, now, now) for name, peer in rows],
        )
        return len(rows)

    def due_deliveries(self, now: float) -> list[Delivery]:
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, id",
                (now,),
            ).fetchall()
        return [Delivery.from_row(r) for r in rows]

    def delivery_sent(self, delivery_id: int, at: float) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, sent_at = ?,"
                " last_error = NULL WHERE id = ?",
                (DeliveryState.SENT.value, at, delivery_id),
            )

    def delivery_failed(
        self, delivery_id: int, *, attempts: int, error: str, dead: bool, next_attempt_at: float
    ) -> None:
        state = DeliveryState.DEAD if dead else DeliveryState.PENDING
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, last_error = ?,"
                " next_attempt_at = ? WHERE id = ?",
                (state.value, attempts, error, next_attempt_at, delivery_id),
            )

    def replay_deliveries(self, *, job_id: int | None = None, all_dead: bool = False) -> int:
        if job_id is None and not all_dead:
            raise ValueError("name a job, or all dead deliveries")
        where, params = (
            ("state = 'dead'", ())
            if job_id is None
            else ("job_id = ? AND state != 'sent'", (job_id,))
        )
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                f" last_error = 'replayed: ' || COALESCE(last_error, '') WHERE {where}",
                (time.time(), *params),
            )
        return cursor.rowcount

    def deliveries_of(self, job_ids: Sequence[int]) -> dict[int, list[Delivery]]:
        if not job_ids:
            return {}
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT * FROM deliveries"
                " WHERE job_id IN (SELECT CAST(value AS INTEGER) FROM json_each(?))"
                " ORDER BY id",
                (_json_list(job_ids),),
            ).fetchall()
        out: dict[int, list[Delivery]] = {}
        for row in rows:
            out.setdefault(row["job_id"], []).append(Delivery.from_row(row))
        return out

    def deliveries(self, *, state: DeliveryState | None = None, limit: int = 200) -> list[Delivery]:
        where, params = ("WHERE state = ?", (state.value,)) if state else ("", ())
        with self.db.reading() as conn:
            rows = conn.execute(
                f"SELECT * FROM deliveries {where} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [Delivery.from_row(r) for r in rows]

    def delivery_counts(self) -> dict[DeliveryState, int]:
        """Deliveries by state; only the states some delivery is in."""
        with self.db.reading() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
        return {DeliveryState(state): count for state, count in rows}

    def delivery_tally(self) -> list[tuple[str, DeliveryState, int]]:
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY 1, 2"
            ).fetchall()
        return [(destination, DeliveryState(state), count) for destination, state, count in rows]

    def destinations(self) -> list[DestinationTally]:
        """Each destination (and peer) deliveries went to, in the order first grouped."""
        with self.db.reading() as conn:
            counts = conn.execute(
                "SELECT destination, peer_aet, "
                + _count_where("state = 'pending'")
                + " AS pending, "
                + _count_where("state = 'pending' AND attempts > 0")
                + " AS retrying, "
                + _count_where("state = 'sent'")
                + " AS sent, "
                + _count_where("state = 'dead'")
                + " AS dead,"
                " MAX(sent_at) AS last_sent_at FROM deliveries GROUP BY destination, peer_aet"
            ).fetchall()
            error_rows = conn.execute(
                "SELECT destination, peer_aet, last_error FROM deliveries WHERE state != 'sent'"
                " AND last_error IS NOT NULL ORDER BY id"
            ).fetchall()
        errors = {(r["destination"], r["peer_aet"]): r["last_error"] for r in error_rows}
        return [
            DestinationTally(
                r["destination"],
                r["peer_aet"],
                r["pending"] or 0,
                r["retrying"] or 0,
                r["sent"] or 0,
                r["dead"] or 0,
                r["last_sent_at"],
                errors.get((r["destination"], r["peer_aet"])),
            )
            for r in counts
        ]

    def delivery_progress(self, job_ids: Sequence[int]) -> dict[int, DeliveryProgress]:
        """Per job that has deliveries: the last one sent and how many are not sent."""
        if not job_ids:
            return {}
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT job_id, MAX(sent_at), "
                + _count_where("state != 'sent'")
                + " FROM deliveries"
                " WHERE job_id IN (SELECT CAST(value AS INTEGER) FROM json_each(?))"
                " GROUP BY job_id",
                (_json_list(job_ids),),
            ).fetchall()
        return {job_id: DeliveryProgress(sent_at, open) for job_id, sent_at, open in rows}


def _count_where(condition: str) -> str:
    """An aggregate counting the rows of a group that meet ``condition`` (SUM of a boolean is
    SQLite's alone)."""
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def _end_attempts(
    conn: Connection,
    where: str,
    params: tuple[object, ...],
    error: str,
    max_attempts: int,
) -> list[tuple[int, JobState]]:
    """End the current attempt of the selected jobs: queued again, or failed when out of
    tries. Each one's ID and new state."""
    rows = conn.execute(
        "UPDATE jobs SET state = CASE WHEN attempts >= ? THEN 'failed' ELSE 'queued' END,"
        f" worker = NULL, {_NO_ATTEMPT}, error = ?, finished_at = ? WHERE {where}"
        " RETURNING id, state",
        (max_attempts, error, time.time(), *params),
    ).fetchall()
    return [(int(r["id"]), JobState(r["state"])) for r in rows]


class PostgresJobStore(SqliteJobStore):
    """:class:`JobStore` on PostgreSQL (cluster mode): the same SQL, plus the locks that
    READ COMMITTED needs where SQLite's one writer at a time gave them for free.

    - A claim's choice is ``FOR UPDATE SKIP LOCKED``: each claim locks the row it picks and
      passes over rows that other claims hold locked, so concurrent claims take different jobs
      instead of waiting for each other (and then finding their pick taken). Once it has the
      lock PostgreSQL checks the row again against the claim's conditions (``state =
      'queued'``...), so a job taken and committed by another claim since the statement began
      is not taken twice.
    - A claim with a concurrency limit first takes a transaction-scoped advisory lock: the
      count of an algorithm's running jobs is a read of other rows, which no row lock
      protects, and two claims could otherwise both see the last free place. Each statement
      under READ COMMITTED sees what was committed before it began, and the lock is released
      at commit, so the next limited claim counts the one before. Claims without a limit
      never wait for it.
    - :meth:`holds` and :meth:`_change` (cancel, requeue) lock the job's row from their read
      to the end of their transaction: an attempt's results and a person's cancel, or a
      lease's expiry, then happen one after the other, never interleaved (an attempt that
      held the job commits its success before the cancel reads it, and the cancel finds it
      ended; or the cancel commits first, and holds is False). The other changes are single
      UPDATEs whose conditions PostgreSQL checks again on the row it locks.
    """

    _LOCK_ROW = " FOR UPDATE"

    # Any 64-bit constant both the node and its workers share: the claims with a limit.
    _LIMITED_CLAIMS_LOCK = 0x6463_6D6E_6F64_6531  # "dcmnode1"

    def _serialize_claim(self, conn: Connection, *, limited: bool) -> None:
        if limited:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (self._LIMITED_CLAIMS_LOCK,))


def job_store(db: Database, *, priority_aging_s: float = PRIORITY_AGING_S) -> JobStore:
    """The node's job store on its database, by its dialect (SQLite or PostgreSQL).
    ``priority_aging_s`` is ``worker.priority_aging_s`` for the stores that claim."""
    cls = PostgresJobStore if db.dialect.name == "postgresql" else SqliteJobStore
    return cls(db, aging_s=priority_aging_s)


def job_store_reading(conn: Connection) -> JobStore:
    """The job store read through a connection the caller opened (the read-only ones of
    ``status``, the API and the metrics), for reads beside the caller's own."""
    return job_store(over(conn))


__all__ = [
    "RETRIEVED_MARK",
    "Activity",
    "CompletionPayload",
    "Delivery",
    "DeliveryProgress",
    "DeliveryState",
    "DestinationTally",
    "DispatchTally",
    "InferencePayload",
    "InferenceRecord",
    "Job",
    "JobKind",
    "JobPayload",
    "JobState",
    "JobStore",
    "PostgresJobStore",
    "RetrievalPayload",
    "SqliteJobStore",
    "job_store",
    "job_store_reading",
    "payload_from_json",
    "retrieved_host",
]
