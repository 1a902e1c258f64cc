"""Prometheus metrics of a running node.

Two kinds: counters of what the ``serve`` process sees happen (associations, instances, bytes,
delivery attempts), kept in memory and counted from the start of the process as Prometheus
expects; and everything the index already knows (completions, routing decisions, jobs, queues,
inference times, workers' GPU memory), read from the database at each scrape so that it includes the
worker processes and survives restarts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dicom_node.database import Connection, has_database, open_reader
from dicom_node.events import (
    AssociationAccepted,
    AssociationRejected,
    DeliveryAttempted,
    Event,
    InstanceReceived,
)
from dicom_node.jobs import DeliveryState, JobKind, JobState, job_store_reading
from dicom_node.priority import PRIORITIES

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

PREFIX = "dicom_node"

# Inference takes from a tenth of a second (a radiograph on a GPU) to minutes (MR on a CPU).
INFERENCE_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)

# A worker whose heartbeat is older than this is taken for dead (it beats every 5 s).
WORKER_STALE_S = 30.0


class LiveCounters:
    """Counters of events in this process; an :class:`~dicom_node.events.Events` sink."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = Counter(
            f"{PREFIX}_associations",
            "DICOM associations requested of the SCP, by outcome.",
            ["result"],
            registry=registry,
        )
        self.instances = Counter(
            f"{PREFIX}_instances_received",
            "C-STORE requests answered, by outcome (stored includes repeats of stored ones).",
            ["result"],
            registry=registry,
        )
        self.fast_path = Counter(
            f"{PREFIX}_instances_received_fast_path",
            "C-STORE requests the fast path answered (the others pynetdicom answered).",
            registry=registry,
        )
        self.bytes = Counter(
            f"{PREFIX}_received_bytes", "Bytes of data sets received by C-STORE.", registry=registry
        )
        self.attempts = Counter(
            f"{PREFIX}_delivery_attempts",
            "Attempts at delivering a job's results, by destination.",
            ["destination"],
            registry=registry,
        )
        self.failures = Counter(
            f"{PREFIX}_delivery_failures",
            "Delivery attempts that failed, by destination.",
            ["destination"],
            registry=registry,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters",
            "Deliveries given up (dead letters), by destination.",
            ["destination"],
            registry=registry,
        )
        for result in ("accepted", "rejected"):
            self.associations.labels(result)
        for result in ("stored", "refused"):
            self.instances.labels(result)

    def emit(self, event: Event) -> None:
        match event:
            case AssociationAccepted():
                self.associations.labels("accepted").inc()
            case AssociationRejected():
                self.associations.labels("rejected").inc()
            case InstanceReceived():
                self.instances.labels("stored" if event.stored else "refused").inc()
                if event.fast_path:
                    self.fast_path.inc()
                self.bytes.inc(event.size)
            case DeliveryAttempted():
                self.attempts.labels(event.destination).inc()
                if not event.ok:
                    self.failures.labels(event.destination).inc()
                if event.dead:
                    self.dead_letters.labels(event.destination).inc()


class IndexCollector(Collector):
    """Metrics read from the node's index at scrape time."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = config.store.data_dir.resolve()

    def collect(self) -> Iterator[Metric]:
        disk = shutil.disk_usage(self.data_dir)
        free = GaugeMetricFamily(
            f"{PREFIX}_disk_free_bytes", "Free space where received data is stored."
        )
        free.add_metric([], disk.free)
        yield free
        if not has_database(self.config):
            return
        with open_reader(self.config) as conn:
            yield from _index_metrics(conn)
            if self.config.cluster.enabled:
                yield _cluster_jobs(conn)


def _cluster_jobs(conn: Connection) -> GaugeMetricFamily:
    """Cluster mode's inference jobs between routing and a worker: a growing ``unstaged``
    says the object store or the sweeper lags, ``staged_unclaimed`` that no worker takes
    them (none up for the algorithm, or the broker lost the doorbells), ``lease_expired`` that
    workers died and the sweeper has not taken their jobs back yet."""
    tally = job_store_reading(conn).dispatch_tally()
    jobs = GaugeMetricFamily(
        f"{PREFIX}_cluster_jobs",
        "Cluster mode: queued inference jobs not staged yet, staged but not claimed by a"
        " worker, and running past their lease (database clock) not yet requeued.",
        labels=["stage"],
    )
    jobs.add_metric(["unstaged"], tally.unstaged)
    jobs.add_metric(["staged_unclaimed"], tally.staged_unclaimed)
    jobs.add_metric(["lease_expired"], tally.leases_expired)
    return jobs


def _index_metrics(conn: Connection) -> Iterator[Metric]:
    for level, table in (("series", "series"), ("study", "studies")):
        completed = CounterMetricFamily(
            f"{PREFIX}_{level}_completed",
            f"Completions of a {level} (a reopened {level} completes again).",
        )
        completed.add_metric(
            [], conn.execute(f"SELECT COALESCE(SUM(completions), 0) FROM {table}").fetchone()[0]
        )
        yield completed

    decisions = CounterMetricFamily(
        f"{PREFIX}_routing_decisions",
        "Routing decisions per algorithm: routed to it, or not (with a recorded reason).",
        labels=["level", "algorithm", "outcome"],
    )
    for outcome, column in (("routed", "routed"), ("not_routed", "not_routed")):
        for row in conn.execute(
            f"SELECT d.level, json_extract(j.value, '$.algorithm'), COUNT(*)"
            f" FROM routing_decisions d, json_each(d.{column}) j GROUP BY 1, 2"
        ):
            decisions.add_metric([row[0], row[1] or "", outcome], row[2])
    yield decisions

    store = job_store_reading(conn)
    tally = store.tally()
    jobs = GaugeMetricFamily(
        f"{PREFIX}_jobs",
        "Jobs by kind, state and priority class (a routing rule's; completions are routine).",
        labels=["kind", "state", "priority"],
    )
    for kind, state, priority, count in tally:
        jobs.add_metric([kind, state.value, priority], count)
    yield jobs

    queue = GaugeMetricFamily(
        f"{PREFIX}_queue_depth",
        "Work waiting: queued routing and inference jobs, deliveries due or backing off.",
        labels=["queue"],
    )
    queued = [(kind, count) for kind, state, _, count in tally if state is JobState.QUEUED]
    inference = sum(count for kind, count in queued if kind == JobKind.INFERENCE.value)
    queue.add_metric(["routing"], sum(count for _, count in queued) - inference)
    queue.add_metric(["inference"], inference)
    delivery_tally = store.delivery_tally()
    queue.add_metric(
        ["delivery"],
        sum(count for _, state, count in delivery_tally if state is DeliveryState.PENDING),
    )
    yield queue

    # The inference queue by class, every class named so that a dashboard's stat line is 0
    # rather than missing while no stat job waits.
    by_priority = GaugeMetricFamily(
        f"{PREFIX}_inference_queue_depth",
        "Queued inference jobs by priority class (its rule's, before aging).",
        labels=["priority"],
    )
    for priority in PRIORITIES:
        by_priority.add_metric(
            [priority],
            sum(
                count
                for kind, state, p, count in tally
                if kind == JobKind.INFERENCE.value and state is JobState.QUEUED and p == priority
            ),
        )
    yield by_priority

    deliveries = GaugeMetricFamily(
        f"{PREFIX}_deliveries", "Deliveries by state.", labels=["destination", "state"]
    )
    for destination, delivery_state, count in delivery_tally:
        deliveries.add_metric([destination, delivery_state.value], count)
    yield deliveries

    yield _inference_histogram(conn)
    yield from _worker_metrics(conn)


def _inference_histogram(conn: Connection) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(
        f"{PREFIX}_inference_seconds",
        "Time an algorithm ran per job (reading its inputs included), by algorithm and device.",
        labels=["algorithm", "device"],
    )
    counts = ", ".join(
        f"SUM(CASE WHEN run_s <= {bound} THEN 1 ELSE 0 END)" for bound in INFERENCE_BUCKETS_S
    )
    for row in conn.execute(
        f"SELECT algorithm, device, {counts}, COUNT(*), SUM(run_s) FROM results"
        " WHERE run_s IS NOT NULL GROUP BY algorithm, device"
    ):
        algorithm, device, *cumulative, total, seconds = row
        buckets = [
            (str(bound), count)
            for bound, count in zip(INFERENCE_BUCKETS_S, cumulative, strict=True)
        ]
        histogram.add_metric([algorithm, device or "unknown"], [*buckets, ("+Inf", total)], seconds)
    return histogram


def _worker_metrics(conn: Connection) -> Iterator[Metric]:
    now = time.time()
    alive = GaugeMetricFamily(
        f"{PREFIX}_worker_up",
        f"1 for an inference worker that beat in the last {WORKER_STALE_S:.0f} s.",
        labels=["worker", "device"],
    )
    memory = GaugeMetricFamily(
        f"{PREFIX}_gpu_memory_bytes",
        "GPU memory of a worker on CUDA: allocated and reserved by PyTorch, and the total.",
        labels=["worker", "device", "kind"],
    )
    for row in conn.execute(
        "SELECT name, device, heartbeat_at, gpu_memory FROM workers WHERE stopped_at IS NULL"
    ):
        up = now - row["heartbeat_at"] < WORKER_STALE_S
        alive.add_metric([row["name"], row["device"]], int(up))
        gpu = json.loads(row["gpu_memory"] or "null")
        if up and gpu:
            for kind, value in gpu.items():
                memory.add_metric([row["name"], row["device"], kind], value)
    yield alive
    yield memory


def node_registry(config: NodeConfig) -> tuple[CollectorRegistry, LiveCounters]:
    """The registry /metrics serves, and the live counters to hand to the node's events."""
    # *_created series only double what a scraper already sees. prometheus_client leaves this
    # function unannotated (its other functions are), so mypy takes it as untyped.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    counters = LiveCounters(registry)
    registry.register(IndexCollector(config))
    return registry, counters
