"""Cluster mode's dispatch: Celery on RabbitMQ as a doorbell, PostgreSQL as the ledger.

A message carries only a job's ID. The worker that takes it claims from the database (the best
queued, staged job of its algorithms, which need not be that one) with a lease and an attempt
token, so a duplicate message claims nothing and a lost one is rung again by the node's
:class:`Sweeper` from what the database says (a transactional outbox): the broker may lose,
repeat or reorder messages without a job being lost or run twice to completion.

The Celery settings are what makes a taken message survive a worker's death (issue 17):
``acks_late`` and ``reject_on_worker_lost`` (a message is acknowledged when its task ends, and
returned when its process dies), a prefetch of 1 (a busy worker holds no second message),
durable queues and persistent messages (a broker restart keeps them), publisher confirms (a
publish returns once the broker has it), one queue per algorithm ``dicom-node.<algorithm>``
with ``x-max-priority`` and the job's priority class as the message priority, and a hard time
limit per message: the algorithm's time limit, which must stay below RabbitMQ's
``consumer_timeout`` (a message unacknowledged longer is taken back by the broker).

celery is imported only here and in :mod:`dicom_node.cluster_worker`, inside functions: an
embedded node never loads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.config import ClusterConfig, NodeConfig
from dicom_node.database import Database
from dicom_node.errors import Permanent
from dicom_node.jobs import Job, JobStore
from dicom_node.loops import Loop
from dicom_node.objects import ObjectStore
from dicom_node.priority import Priority
from dicom_node.staging import prestage_open_series, stage_job
from dicom_node.store import store_key

log = logging.getLogger(__name__)

TASK_NAME = "dicom_node.run_job"  # the one task: run whichever job the worker can claim
QUEUE_PREFIX = "dicom-node."
EXCHANGE = "dicom-node"
MAX_PRIORITY = 10  # the queues' x-max-priority (RabbitMQ: 1..255; fewer levels cost less)
# The job's priority class as the message's priority (AMQP: higher is delivered first).
MESSAGE_PRIORITY: Mapping[Priority, int] = {"stat": 9, "urgent": 6, "routine": 3}
# RabbitMQ's default consumer_timeout (30 min since 3.8.15): an unacknowledged message older
# than this closes its channel, so a job's hard time limit must stay below the broker's.
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S = 1800.0
# How long one publish may retry while the broker is unreachable: the sweeper's loop backs
# off and rings again later rather than stalling.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


SWEEP_BACKOFF_MAX_S = 10.0


# How often the series still arriving are uploaded (at most: cluster.sweep_interval_s).
PRESTAGE_INTERVAL_S = 0.25


def queue_name(algorithm: str) -> str:
    """The queue of an algorithm's doorbells."""
    return f"{QUEUE_PREFIX}{algorithm}"


def queues(algorithms: Sequence[str]) -> list[Any]:
    """The durable priority queues of ``algorithms`` (kombu ``Queue``), one each."""
    from kombu.entity import Exchange, Queue

    exchange = Exchange(EXCHANGE, type="direct", durable=True)  # type: ignore[no-untyped-call]
    return [
        Queue(  # type: ignore[no-untyped-call]
            queue_name(name),
            exchange,
            routing_key=queue_name(name),
            durable=True,
            queue_arguments={"x-max-priority": MAX_PRIORITY},
        )
        for name in sorted(set(algorithms))
    ]


def celery_app(cluster: ClusterConfig, algorithms: Sequence[str]) -> Any:
    """The Celery app of the node (it publishes) and of a cluster worker (it consumes the
    queues of ``algorithms``), configured from ``cluster``."""
    from celery import Celery  # type: ignore[import-untyped]

    if cluster.broker_url is None:
        raise ValueError("cluster.broker_url is not set: cluster mode needs RabbitMQ")
    app = Celery("dicom_node", broker=cluster.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_delivery_mode="persistent",
        task_queues=queues(algorithms),
        task_create_missing_queues=False,
        task_default_exchange=EXCHANGE,
        task_default_exchange_type="direct",
        task_queue_max_priority=MAX_PRIORITY,
        task_default_priority=MESSAGE_PRIORITY["routine"],
        task_ignore_result=True,  # the database is the ledger: no result backend
        task_publish_retry=True,
        task_publish_retry_policy=_PUBLISH_RETRY,
        broker_transport_options={"confirm_publish": True},
        broker_connection_timeout=5,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a broker restart
        # A job running when the broker connection drops (RabbitMQ restarted) runs on and
        # commits: its lease, not its message, says it holds the job. The message comes back
        # to the queue and is a duplicate doorbell, which claims nothing.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_heartbeat=30,
    )
    return app


def time_limit_warning(
    limits: Mapping[str, float], consumer_timeout_s: float = RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S
) -> str | None:
    """A warning when an algorithm's time limit (a job's hard limit, and how long its message
    stays unacknowledged) reaches RabbitMQ's ``consumer_timeout``; None when none does."""
    over = {name: limit for name, limit in limits.items() if limit >= consumer_timeout_s}
    if not over:
        return None
    longest = max(over.values())
    return (
        f"job time limits of {', '.join(f'{n} {s:g} s' for n, s in sorted(over.items()))}"
        f" reach RabbitMQ's default consumer_timeout ({consumer_timeout_s:g} s): set"
        f" consumer_timeout above {longest:g} s (in milliseconds) in rabbitmq.conf, or the broker"
        " takes such a job's message back while it runs"
    )


def ring(app: Any, job: Job, time_limit_s: float) -> None:
    """Publish the doorbell of ``job`` (its ID) on its algorithm's queue, at its priority, with
    its hard time limit; returns once the broker confirmed it (raises when it cannot)."""
    # The queue itself, not its name: Celery declares it before publishing, so that a
    # doorbell rung before any worker of the algorithm started (or after the broker lost its
    # data) waits in its queue instead of being dropped by an exchange with no queue bound.
    (queue,) = queues([job.inference.algorithm])
    app.send_task(
        TASK_NAME,
        args=(job.id,),
        queue=queue,
        priority=MESSAGE_PRIORITY[job.priority],
        time_limit=time_limit_s,
    )


class Sweeper:
    """The node's side of dispatch, one step every ``cluster.sweep_interval_s`` (a
    :class:`~dicom_node.loops.Loop`): take back jobs whose lease ran out, stage the queued
    jobs not staged yet, ring the staged jobs never rung or rung too long ago, and record the
    rings. A second loop uploads series while they arrive (``prestage``), so that staging at
    completion finds the files there."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        jobs: JobStore,
        data_dir: Path,
        objects: ObjectStore,
        app: Any,
        time_limits: Mapping[str, float],
        default_limit_s: float,
    ) -> None:
        self.config = config
        self.db = db
        self.jobs = jobs
        self.data_dir = data_dir
        self.objects = objects
        self.app = app
        self.time_limits = dict(time_limits)
        self.default_limit_s = default_limit_s
        self._prestaged_since = time.time()
        interval = config.cluster.sweep_interval_s
        # Backing off at most SWEEP_BACKOFF_MAX_S: after a broker or database outage the
        # sweeper's next try is when dispatch resumes, so a minute's cap would add a minute.
        self.loop = Loop(
            "sweeper", self.step, interval, backoff_max_s=max(interval, SWEEP_BACKOFF_MAX_S)
        )
        # More often than the sweep: what it has not uploaded when the series completes is
        # uploaded by the staging, on the way from completion to the doorbell.
        self.prestage_loop = Loop("prestage", self.prestage, min(interval, PRESTAGE_INTERVAL_S))

    @property
    def loops(self) -> list[Loop]:
        return [self.loop, self.prestage_loop]

    def limit(self, job: Job) -> float:
        return self.time_limits.get(job.inference.algorithm, self.default_limit_s)

    def step(self) -> bool:
        """One sweep; True when a page was full (more to do at once)."""
        expired = self.jobs.requeue_expired(max_attempts=self.config.worker.max_attempts)
        if expired:
            log.warning(
                "%d job(s) whose lease ran out taken back: %s",
                len(expired),
                ", ".join(map(str, expired)),
            )
        staged_more = self.stage_unstaged()
        rung_more = self.ring_due()
        return staged_more or rung_more

    def stage_unstaged(self, limit: int = 100) -> bool:
        """Stage the queued jobs not staged yet; True when there may be more."""
        pending = self.jobs.unstaged(limit)
        for job in pending:
            try:
                stage_job(job, self.db, self.jobs, self.data_dir, self.objects)
            except Permanent as exc:
                # Its inputs are gone (retention, a removed series): no try can stage it, and
                # queued it would wait for ever, so it fails with the reason, as a job whose
                # worker met the same would.
                reason = f"{type(exc).__name__}: {exc}".replace(
                    job.subject_uid, store_key(job.subject_uid)
                )
                self.jobs.fail_queued(job.id, f"cannot be staged: {reason}")
                log.error("job %d cannot be staged, and failed: %s", job.id, reason)
        return len(pending) >= limit

    def ring_due(self, limit: int = 500) -> bool:
        """Ring every staged job due a doorbell and record the rings; True when a page was
        full. Rings that went out before a failing one are recorded before it is raised."""
        due = self.jobs.to_dispatch(redispatch_s=self.config.cluster.redispatch_s, limit=limit)
        rung: list[int] = []
        try:
            for job in due:
                ring(self.app, job, self.limit(job))
                rung.append(job.id)
        finally:
            if rung:
                self.jobs.mark_dispatched(rung)
                log.debug("rang %d job(s): %s", len(rung), rung)
        return len(due) >= limit

    def prestage(self) -> None:
        """Upload what arrived of series still open (the prestage loop's step)."""
        self._prestaged_since = prestage_open_series(
            self.db, self.data_dir, self.objects, self._prestaged_since
        )
