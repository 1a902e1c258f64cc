"""The job store's contract on both of its databases (issue 17): attempt tokens, leases by
the database clock, staging and dispatch bookkeeping, the claim's order, and claims racing
from several connections. The same tests run on SQLite (embedded mode) and on a real
PostgreSQL server (cluster mode)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

import pytest
from pydicom.uid import generate_uid

from dicom_node.database import Database
from dicom_node.jobs import (
    CompletionPayload,
    InferencePayload,
    JobKind,
    JobState,
    JobStore,
    PostgresJobStore,
    SqliteJobStore,
    job_store,
)
from tests.support.jobs import OpenDatabase, backend, queue
from tests.support.postgres import postgres_server, postgres_url

__all__ = ["backend", "postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.unit


@pytest.fixture
def db(backend: OpenDatabase) -> Database:
    return backend()


def database_now(db: Database) -> float:
    with db.reading() as conn:
        return float(conn.execute(f"SELECT {db.dialect.now}").fetchone()[0])


def until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> object:
    """Poll ``condition`` until it is truthy (a lease running out by the database clock)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what}")
        time.sleep(0.01)
    return value


def test_job_store_picks_the_store_by_the_database(db: Database) -> None:
    store = job_store(db)
    expected = PostgresJobStore if db.dialect.name == "postgresql" else SqliteJobStore
    assert type(store) is expected


# -- tokens and leases -----------------------------------------------------------------------


def test_each_claim_gives_a_fresh_token_and_a_lease_by_the_database_clock(db: Database) -> None:
    store = job_store(db)
    leased, plain = queue(db, "a", "a")
    before = database_now(db)
    job = store.claim("w", (JobKind.INFERENCE,), lease_s=30)
    after = database_now(db)
    assert job is not None and job.id == leased and job.state is JobState.RUNNING
    assert job.token is not None and len(job.token) == 32
    assert job.lease_until is not None and before + 30 <= job.lease_until <= after + 30
    other = store.claim("w", (JobKind.INFERENCE,))
    assert other is not None and other.id == plain
    assert other.lease_until is None  # no lease: held until it ends or its worker is dead
    assert other.token is not None and other.token != job.token
    with db.transaction() as conn:
        assert store.holds(conn, leased, "w", token=job.token)
        assert store.holds(conn, leased, "w")  # the embedded worker's check: no token
        assert not store.holds(conn, leased, "w", token=other.token)
        assert not store.holds(conn, leased, "w2", token=job.token)
    stored = store.get(leased)
    assert stored is not None and (stored.token, stored.lease_until) == (job.token, job.lease_until)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lease"):
            store.claim("w", lease_s=bad)


def test_an_expired_lease_is_taken_back_and_the_old_attempt_is_refused(db: Database) -> None:
    """A frozen worker's job: its lease runs out by the database clock, the sweeper queues it
    again, another attempt claims it (here the same worker, so only the token tells them
    apart); the thawed attempt can neither commit, nor fail it, nor renew its lease."""
    store = job_store(db)
    (job_id,) = queue(db, "a")
    first = store.claim("w", (JobKind.INFERENCE,), lease_s=0.001)
    assert first is not None and first.token is not None
    expired = until(lambda: store.requeue_expired(max_attempts=3), "the lease to run out")
    assert expired == [job_id]
    queued = store.get(job_id)
    assert queued is not None and queued.state is JobState.QUEUED
    assert (queued.attempts, queued.worker, queued.token, queued.lease_until) == (
        1,
        None,
        None,
        None,
    )
    assert queued.error is not None and queued.error.startswith("lease expired")

    second = store.claim("w", (JobKind.INFERENCE,), lease_s=60)
    assert second is not None and second.id == job_id and second.attempts == 2
    assert second.token not in (None, first.token)
    with db.transaction() as conn:
        assert not store.holds(conn, job_id, "w", token=first.token)  # its commit is refused
        assert store.holds(conn, job_id, "w", token=second.token)
    assert not store.renew_lease(job_id, first.token, 60)
    assert store.fail(job_id, "late", worker="w", max_attempts=3, token=first.token) is None
    running = store.get(job_id)
    assert running is not None and running.state is JobState.RUNNING
    assert running.token == second.token
    assert store.requeue_expired(max_attempts=3) == []  # the new lease has not run out
    assert second.token is not None and store.renew_lease(job_id, second.token, 120)
    renewed = store.get(job_id)
    assert renewed is not None and second.lease_until is not None
    assert renewed.lease_until is not None and renewed.lease_until > second.lease_until
    assert store.fail(job_id, "boom", worker="w", max_attempts=3, token=second.token) is (
        JobState.QUEUED
    )


def test_a_lease_out_of_attempts_fails_the_job(db: Database) -> None:
    store = job_store(db)
    expiring, leaseless, long = queue(db, "a", "a", "a")
    store.claim("w1", (JobKind.INFERENCE,), lease_s=0.001)
    store.claim("w2", (JobKind.INFERENCE,))
    store.claim("w3", (JobKind.INFERENCE,), lease_s=3600)
    assert until(lambda: store.requeue_expired(max_attempts=1), "the lease") == [expiring]
    failed = store.get(expiring)
    assert failed is not None and failed.state is JobState.FAILED and failed.attempts == 1
    # A job claimed without a lease never expires; one whose lease has not run out stays.
    assert [store.get(i).state for i in (leaseless, long)] == [JobState.RUNNING] * 2  # type: ignore[union-attr]


def test_a_cluster_node_takes_back_only_the_kinds_it_runs_itself(db: Database) -> None:
    """A node restarted in cluster mode requeues its own routing jobs left running (they ran
    in its process) and leaves the running inference jobs to their workers' leases."""
    store = job_store(db)
    (inference,) = queue(db, "a")
    with db.transaction() as conn:
        routing = store.enqueue(
            conn,
            JobKind.STUDY_COMPLETE,
            "1.2.9",
            1,
            CompletionPayload("study", "1.2.9", 1, "quiet", 0.0),
        )
    assert store.claim("host-0", (JobKind.INFERENCE,), lease_s=3600) is not None
    assert store.claim("router", (JobKind.STUDY_COMPLETE,)) is not None
    kinds = (JobKind.SERIES_COMPLETE, JobKind.STUDY_COMPLETE)
    assert store.requeue_interrupted(kinds) == 1
    assert [store.get(i).state for i in (routing, inference)] == [  # type: ignore[union-attr]
        JobState.QUEUED,
        JobState.RUNNING,
    ]
    assert store.requeue_interrupted() == 1  # embedded mode: every kind
    assert store.get(inference).state is JobState.QUEUED  # type: ignore[union-attr]


def test_renewing_fails_once_the_attempt_lost_the_job(db: Database) -> None:
    store = job_store(db)
    cancelled, ended = queue(db, "a", "a")
    job = store.claim("w", (JobKind.INFERENCE,), lease_s=60)
    assert job is not None and job.id == cancelled and job.token is not None
    store.cancel(cancelled, "alice")
    assert not store.renew_lease(cancelled, job.token, 60)  # the heartbeat learns it
    done = store.claim("w", (JobKind.INFERENCE,), lease_s=60)
    assert done is not None and done.token is not None
    store.succeed(ended)
    assert not store.renew_lease(ended, done.token, 60)
    with pytest.raises(ValueError, match="lease"):
        store.renew_lease(ended, done.token, float("inf"))


def test_a_cancel_waits_for_the_commit_of_an_attempt_that_holds_the_job(
    backend: OpenDatabase,
) -> None:
    """The worker's check and its commit are one transaction; a cancel coming in between
    (another process) waits for it and then finds the job ended: never cancelled after its
    results were recorded."""
    worker_db, person_db = backend(), backend()
    store = job_store(worker_db)
    (job_id,) = queue(worker_db, "a")
    job = store.claim("w", (JobKind.INFERENCE,), lease_s=60)
    assert job is not None
    outcome: list[object] = []
    with worker_db.transaction() as conn:
        assert store.holds(conn, job_id, "w", token=job.token)
        person = threading.Thread(
            target=lambda: outcome.append(job_store(person_db).cancel(job_id, "bob"))
        )
        person.start()
        person.join(0.3)
        assert person.is_alive()  # waiting for the worker's transaction
        store.mark_succeeded(conn, job_id)
    person.join(30)
    assert outcome == [None]  # ended by then: nothing to cancel
    ended = store.get(job_id)
    assert ended is not None and ended.state is JobState.SUCCEEDED


def test_a_lease_that_runs_out_while_its_attempt_commits_is_not_taken_back(
    backend: OpenDatabase,
) -> None:
    """A worker that was slow past its lease but still holds the job (nobody took it back
    yet) commits; the sweeper coming in between waits for that commit and then finds nothing
    to take back, rather than queueing a job whose results were just recorded."""
    worker_db, node_db = backend(), backend()
    store = job_store(worker_db)
    (job_id,) = queue(worker_db, "a")
    job = store.claim("w", (JobKind.INFERENCE,), lease_s=0.001)
    assert job is not None and job.lease_until is not None
    until(lambda: database_now(worker_db) > job.lease_until, "the lease to run out")  # type: ignore[operator]
    taken_back: list[list[int]] = []
    with worker_db.transaction() as conn:
        assert store.holds(conn, job_id, "w", token=job.token)  # out of lease, not taken back
        sweeper = threading.Thread(
            target=lambda: taken_back.append(job_store(node_db).requeue_expired(max_attempts=3))
        )
        sweeper.start()
        sweeper.join(0.3)
        assert sweeper.is_alive()  # waiting for the attempt's transaction
        store.mark_succeeded(conn, job_id)
    sweeper.join(30)
    assert taken_back == [[]]
    ended = store.get(job_id)
    assert ended is not None and ended.state is JobState.SUCCEEDED and ended.attempts == 1


# -- staging and dispatch ----------------------------------------------------------------------


def test_only_staged_jobs_are_claimed_with_staged_only(db: Database) -> None:
    store = job_store(db)
    older, newer = queue(db, "a", "b")
    with db.transaction() as conn:  # a completion job is never staged: the node routes it
        completion = CompletionPayload("series", "9.9", 1, "association released", 0.0)
        store.enqueue(conn, JobKind.SERIES_COMPLETE, "9.9", 1, completion)
    assert [j.id for j in store.unstaged()] == [older, newer]
    assert [j.id for j in store.unstaged(limit=1)] == [older]
    assert store.claim("w", staged_only=True) is None
    before = database_now(db)
    store.mark_staged(newer)
    (staged,) = [j for j in (store.get(newer),) if j is not None]
    assert staged.staged_at is not None and staged.staged_at >= before
    assert [j.id for j in store.unstaged()] == [older]
    job = store.claim("w", staged_only=True)
    assert job is not None and job.id == newer
    assert store.claim("w", staged_only=True) is None
    assert store.unstaged() == [store.get(older)]  # a running job is not staged again


def test_a_queued_job_that_cannot_be_staged_fails_and_a_requeue_stages_it_again(
    db: Database,
) -> None:
    store = job_store(db)
    gone, other = queue(db, "a", "b")
    before = store.get(gone)
    assert store.fail_queued(gone, "cannot be staged: InputError: no instances") == before
    failed = store.get(gone)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error == "cannot be staged: InputError: no instances"
    assert failed.finished_at is not None
    assert [j.id for j in store.unstaged()] == [other]  # no longer waiting to be staged
    assert store.fail_queued(gone, "again") is None  # only a queued job
    running = store.claim("w", (JobKind.INFERENCE,))
    assert running is not None and running.id == other
    assert store.fail_queued(other, "running") is None  # its attempt ends it, not this
    assert store.requeue(gone, "admin") is not None
    assert [j.id for j in store.unstaged()] == [gone]


def test_to_dispatch_rings_staged_queued_jobs_again_only_after_redispatch_s(db: Database) -> None:
    store = job_store(db)
    first, second, unstaged = queue(db, "a", "b", "c")
    store.mark_staged(first)
    store.mark_staged(second)
    assert [j.id for j in store.to_dispatch(redispatch_s=60)] == [first, second]
    assert [j.id for j in store.to_dispatch(redispatch_s=60, limit=1)] == [first]
    store.mark_dispatched([first, second])
    rung = store.get(first)
    assert rung is not None and rung.dispatched_at is not None
    assert store.to_dispatch(redispatch_s=3600) == []  # rung: not again before redispatch_s
    # Rung and not claimed for longer than redispatch_s: the message may be lost, ring again.
    again = until(lambda: store.to_dispatch(redispatch_s=0.001), "redispatch_s to pass")
    assert [j.id for j in again] == [first, second]  # type: ignore[attr-defined]
    claimed = store.claim("w", lease_s=0.001, staged_only=True)
    assert claimed is not None and claimed.id == first
    assert [j.id for j in store.to_dispatch(redispatch_s=0.001)] == [second]
    # Taken back when its lease ran out: rung again at once, not redispatch_s later.
    until(lambda: store.requeue_expired(max_attempts=3), "the lease to run out")
    assert [j.id for j in store.to_dispatch(redispatch_s=3600)] == [first]
    store.mark_dispatched([])  # nothing to record
    assert unstaged not in [j.id for j in store.to_dispatch(redispatch_s=0.001)]
    with pytest.raises(ValueError, match="redispatch"):
        store.to_dispatch(redispatch_s=0)


# -- the claim's order -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("queued", "at", "order"),
    [
        # No job aged yet: stat, urgent, routine, then the oldest.
        (
            [("routine", 10), ("urgent", 20), ("routine", 5), ("stat", 30), ("urgent", 15)],
            100,
            ["stat@30", "urgent@15", "urgent@20", "routine@5", "routine@10"],
        ),
        # One aging period: the routine job counts as urgent, and is older.
        ([("routine", 0), ("urgent", 650)], 700, ["routine@0", "urgent@650"]),
        ([("routine", 0), ("urgent", 500)], 599.999, ["urgent@500", "routine@0"]),
        # Exactly two periods make a routine job stat; just under, urgent.
        ([("routine", 0), ("stat", 1100)], 1200, ["routine@0", "stat@1100"]),
        ([("routine", 0), ("stat", 1100)], 1199.5, ["stat@1100", "routine@0"]),
        # Aged stat stays stat; a job queued "after" the claim's now (clocks) is not aged.
        (
            [("stat", 0), ("routine", 5000), ("urgent", 5001)],
            5000.5,
            ["stat@0", "urgent@5001", "routine@5000"],
        ),
    ],
)
def test_the_claim_order_is_the_same_on_both_databases(
    backend: OpenDatabase, queued: list[tuple[str, float]], at: float, order: list[str]
) -> None:
    """Priority and aging by comparisons both databases make alike (PostgreSQL rounds a CAST
    to an integer where SQLite truncates: 599.999 s would have aged there)."""
    db = backend()
    clock = Clock()
    store = type(job_store(db))(db, aging_s=600, clock=clock)  # type: ignore[call-arg]
    ids = {}
    for priority, created in queued:
        clock.now = created
        with db.transaction() as conn:
            ids[f"{priority}@{created:g}"] = store.enqueue(
                conn,
                JobKind.INFERENCE,
                generate_uid(),
                1,
                InferencePayload("a", {"series": "1.2"}, "series"),
                priority,
            )
    for job_id in ids.values():
        store.mark_staged(job_id)
    names = {job_id: name for name, job_id in ids.items()}
    clock.now = at
    # What the sweeper rings first is what a worker claims first.
    assert [names[j.id] for j in store.to_dispatch(redispatch_s=60)] == order
    claimed = []
    while (job := store.claim("w")) is not None:
        claimed.append(names[job.id])
    assert claimed == order


# -- claims racing ---------------------------------------------------------------------------


def race(backend: OpenDatabase, workers: int, work: Callable[[JobStore, str], None]) -> None:
    """Run ``work(store, name)`` in ``workers`` threads, each on a connection of its own (as
    worker processes on other hosts have); re-raise what any of them raised."""
    errors: list[BaseException] = []
    stores = [job_store(backend()) for _ in range(workers)]

    def run(store: JobStore, name: str) -> None:
        try:
            work(store, name)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(store, f"w{n}")) for n, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_racing_claimers_take_each_job_exactly_once(backend: OpenDatabase) -> None:
    db = backend()
    ids = queue(db, *(["a", "b", "c"] * 60))
    taken: list[tuple[str, int, str | None]] = []
    lock = threading.Lock()

    def work(store: JobStore, name: str) -> None:
        while (job := store.claim(name, lease_s=60)) is not None:
            with lock:
                taken.append((name, job.id, job.token))

    race(backend, 4, work)
    assert sorted(job_id for _, job_id, _ in taken) == sorted(ids)
    assert Counter(job_id for _, job_id, _ in taken).most_common(1)[0][1] == 1
    assert len({token for *_, token in taken}) == len(ids)
    store = job_store(db)
    assert all(store.get(i).worker == name for name, i, _ in taken)  # type: ignore[union-attr]
    assert len({name for name, *_ in taken}) > 1  # the claims did race


def test_racing_claimers_never_exceed_a_concurrency_limit(backend: OpenDatabase) -> None:
    """The count of running jobs is read in the claim's own transaction (on PostgreSQL, under
    an advisory lock): the runs of the limited algorithm, as the jobs record them, never
    overlap, however the claims race."""
    db = backend()
    ids = queue(db, *(["big"] * 12))
    probe = job_store(db)

    def work(store: JobStore, name: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = store.claim(name, (JobKind.INFERENCE,), concurrency={"big": 1})
            if job is None:
                if all(probe.get(i).state is JobState.SUCCEEDED for i in ids):  # type: ignore[union-attr]
                    return
                time.sleep(0.001)
                continue
            time.sleep(0.01)  # the run
            store.succeed(job.id)
            time.sleep(0.005)

    race(backend, 3, work)
    jobs = sorted((probe.get(i) for i in ids), key=lambda j: j.started_at)
    assert all(j.state is JobState.SUCCEEDED for j in jobs)  # type: ignore[union-attr]
    for before, after in pairwise(jobs):
        assert before.finished_at <= after.started_at, (before, after)
