"""What the node holds, read from its index without disturbing a running node.

The report opens the database read-only (WAL lets it read while the SCP writes), so
``dicom-node status`` is safe to run at any time, as often as a script likes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import api
from dicom_node.database import Connection, has_database, open_reader
from dicom_node.jobs import DeliveryState, JobKind, JobState, job_store_reading
from dicom_node.priority import PRIORITIES

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig


@dataclass(frozen=True)
class SenderSummary:
    calling_aet: str
    studies: int
    series: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class SeriesSummary:
    series_uid: str
    study_uid: str
    modality: str | None
    series_number: int | None
    instances: int
    complete: bool
    completions: int
    last_received: str
    completion_latency_s: float | None  # last instance -> latest completion
    routing: str | None  # the latest routing decision for the series, in one line


@dataclass(frozen=True)
class StatusReport:
    data_dir: str
    studies: int
    studies_complete: int
    series: int
    series_complete: int
    instances: int
    bytes: int
    senders: list[SenderSummary]
    recent_series: list[SeriesSummary]
    jobs: dict[str, int]
    study_routing: list[dict[str, Any]]  # the latest study-level decisions
    outputs: dict[str, int] = field(default_factory=dict)  # DICOM results written, by kind
    recent_outputs: list[dict[str, Any]] = field(default_factory=list)
    deliveries: dict[str, int] = field(default_factory=dict)  # by state: pending, sent, dead
    # Queued inference jobs by their rule's class (stat, urgent, routine), before aging.
    queued_by_priority: dict[str, int] = field(default_factory=dict)
    # Embedded or cluster, with the cluster's servers (api.mode) and, in cluster mode, its
    # jobs between routing and a worker (api.node).
    mode: dict[str, Any] = field(default_factory=lambda: {"mode": "embedded"})
    # Workers not stopped (the node's own, or the cluster's on their hosts), as api.workers.
    workers: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def _empty(data_dir: Path, mode: dict[str, Any]) -> StatusReport:
    return StatusReport(
        str(data_dir), 0, 0, 0, 0, 0, 0, [], [], {s.value: 0 for s in JobState}, [], mode=mode
    )


def build_report(config: NodeConfig, *, recent: int = 20) -> StatusReport:
    """Summarise the node's store; an empty report when nothing was received yet."""
    data_dir = config.store.data_dir.resolve()
    if not has_database(config):
        return _empty(data_dir, api.mode(config))
    with open_reader(config) as conn:
        report = _report(conn, data_dir, recent)
        return replace(
            report,
            mode=api.node(conn, config),
            workers=[w for w in api.workers(conn) if w["stopped_at"] is None],
        )


def _report(conn: Connection, data_dir: Path, recent: int) -> StatusReport:
    studies, studies_complete = conn.execute(
        "SELECT COUNT(*), COUNT(completed_at) FROM studies"
    ).fetchone()
    series, series_complete = conn.execute(
        "SELECT COUNT(*), COUNT(completed_at) FROM series"
    ).fetchone()
    instances, size = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances"
    ).fetchone()
    senders = [
        SenderSummary(r[0], r[1], r[2], r[3], r[4])
        for r in conn.execute(
            "SELECT calling_aet, COUNT(DISTINCT study_uid), COUNT(DISTINCT series_uid),"
            " COUNT(*), SUM(size) FROM instances GROUP BY calling_aet ORDER BY calling_aet"
        )
    ]
    rows = conn.execute(
        "SELECT s.series_uid, s.study_uid, s.modality, s.series_number, s.completed_at,"
        " s.completions, s.last_received,"
        " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS n,"
        " (SELECT summary FROM routing_decisions d WHERE d.level = 'series'"
        "  AND d.subject_uid = s.series_uid ORDER BY d.generation DESC LIMIT 1) AS routing"
        " FROM series s ORDER BY s.last_received DESC LIMIT ?",
        (recent,),
    ).fetchall()
    recent_series = [
        SeriesSummary(
            series_uid=r["series_uid"],
            study_uid=r["study_uid"],
            modality=r["modality"],
            series_number=r["series_number"],
            instances=r["n"],
            complete=r["completed_at"] is not None,
            completions=r["completions"],
            last_received=_iso(r["last_received"]),
            completion_latency_s=(
                round(r["completed_at"] - r["last_received"], 3)
                if r["completed_at"] is not None
                else None
            ),
            routing=r["routing"],
        )
        for r in rows
    ]
    store = job_store_reading(conn)
    jobs = {state.value: count for state, count in store.counts().items()}
    queued_by_priority: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
    for kind, state, priority, count in store.tally():
        if kind == JobKind.INFERENCE.value and state is JobState.QUEUED:
            queued_by_priority[priority] += count
    study_routing = [
        {"study_uid": r["subject_uid"], "generation": r["generation"], "routing": r["summary"]}
        for r in conn.execute(
            "SELECT subject_uid, generation, summary FROM routing_decisions"
            " WHERE level = 'study' ORDER BY id DESC LIMIT ?",
            (recent,),
        )
    ]
    outputs = dict(conn.execute("SELECT kind, COUNT(*) FROM outputs GROUP BY kind").fetchall())
    recent_outputs = [
        {"job": r["job_id"], "kind": r["kind"], "path": str(data_dir / r["path"])}
        for r in conn.execute(
            "SELECT job_id, kind, path FROM outputs ORDER BY job_id DESC, kind LIMIT ?",
            (recent,),
        )
    ]
    deliveries = {state.value: count for state, count in store.delivery_counts().items()}
    return StatusReport(
        str(data_dir),
        studies,
        studies_complete,
        series,
        series_complete,
        instances,
        size,
        senders,
        recent_series,
        jobs,
        study_routing,
        outputs,
        recent_outputs,
        deliveries,
        queued_by_priority,
    )


def _mode_line(mode: dict[str, Any]) -> str:
    if mode["mode"] != "cluster":
        return "mode: embedded"
    return (
        f"mode: cluster (PostgreSQL {mode['postgresql']}, RabbitMQ {mode['rabbitmq']},"
        f" objects {mode['objects']})"
    )


def format_report(report: StatusReport) -> str:
    """The report as a person reads it in a terminal."""
    lines = [
        _mode_line(report.mode),
        f"data: {report.data_dir}",
        f"received: {report.studies} studies ({report.studies_complete} complete), "
        f"{report.series} series ({report.series_complete} complete), "
        f"{report.instances} instances, {report.bytes / 2**20:.1f} MiB",
        "",
        "by calling AE:",
    ]
    if not report.senders:
        lines.append("  (nothing received yet)")
    for s in report.senders:
        lines.append(
            f"  {s.calling_aet:<16} {s.studies:>6} studies {s.series:>6} series"
            f" {s.instances:>8} instances"
        )
    lines += ["", f"latest series (up to {len(report.recent_series)}):"]
    for series in report.recent_series:
        state = (
            f"complete x{series.completions},"
            f" {series.completion_latency_s:.3f} s after last instance"
            if series.complete
            else "open"
        )
        number = series.series_number if series.series_number is not None else "-"
        lines.append(
            f"  {series.modality or '?':<4} #{number:<5} {series.instances:>6} inst  {state}"
            f"  last {series.last_received}  {series.series_uid}"
        )
        if series.routing:
            lines.append(f"       routing: {series.routing}")
    if report.study_routing:
        lines += ["", "latest study decisions:"]
        for d in report.study_routing:
            lines.append(f"  {d['study_uid']} (generation {d['generation']}): {d['routing']}")
    lines += ["", "jobs: " + ", ".join(f"{k} {v}" for k, v in report.jobs.items())]
    if "jobs" in report.mode:
        tally = report.mode["jobs"]
        lines.append(
            f"  cluster inference: {tally['unstaged']} unstaged,"
            f" {tally['staged_unclaimed']} staged not claimed,"
            f" {tally['leases_expired']} lease(s) expired not yet requeued"
        )
    if any(report.queued_by_priority.values()):
        lines.append(
            "  queued inference by priority: "
            + ", ".join(f"{p} {n}" for p, n in report.queued_by_priority.items())
        )
    if report.workers:
        lines += ["", "workers (not stopped):"]
        now = time.time()
        for w in report.workers:
            doing = f"job {w['job_id']} {w['job_phase'] or ''}".strip() if w["job_id"] else "idle"
            lines.append(
                f"  {w['name']:<20} {w['host']:<16} {w['device']:<8} {doing:<20}"
                f" beat {now - w['heartbeat_at']:.0f} s ago"
                + ("" if w["alive"] else " (no recent heartbeat: taken for dead)")
            )
    if report.outputs:
        written = ", ".join(f"{n} {kind}" for kind, n in sorted(report.outputs.items()))
        kept = "" if report.deliveries else " (no destination: kept here)"
        lines += ["", f"results written as DICOM: {written}{kept}"]
        lines += [f"  job {o['job']:<5} {o['kind']:<3} {o['path']}" for o in report.recent_outputs]
    if report.deliveries:
        states = ", ".join(f"{k} {v}" for k, v in sorted(report.deliveries.items()))
        dead = (
            " (dicom-node jobs lists why; jobs retry replays)"
            if DeliveryState.DEAD.value in report.deliveries
            else ""
        )
        lines += ["", f"deliveries: {states}{dead}"]
    return "\n".join(lines)
