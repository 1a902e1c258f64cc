"""``dicom-node cluster check``: whether this host can use the cluster's three servers.

One line per check, each saying what was found: PostgreSQL (reachable, the schema version, the
privileges the node and workers need, this host's clock against the database's), RabbitMQ
(connect, declare the algorithm queues with the arguments the workers declare them with: a
queue made with other arguments is refused), the object store (put, get and delete a probe
object). Read-only on the database: nothing is created there.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dicom_node.config import NodeConfig
from dicom_node.database import SCHEMA_VERSION, open_reader
from dicom_node.dispatch import celery_app, queues, time_limit_warning

# Leases are measured by the database clock alone, but the times a host records (a result's
# created_at, a heartbeat) are its own: a host further off than this misleads the dashboard.
CLOCK_SKEW_LIMIT_S = 5.0
# What the node and the workers do to these tables.
_TABLES = ("instances", "series", "jobs", "results", "outputs", "deliveries", "workers")
_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


@dataclass(frozen=True)
class CheckLine:
    server: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.server}: {self.detail}"


def _guarded(server: str, check: Callable[[], CheckLine]) -> CheckLine:
    try:
        return check()
    except Exception as exc:  # any failure is the check's answer, said in one line
        return CheckLine(server, False, f"{type(exc).__name__}: {exc}".strip())


def check_database(config: NodeConfig) -> CheckLine:
    started = time.time()
    with open_reader(config) as conn:
        row = conn.execute(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp()), current_user, version()"
        ).fetchone()
        ended = time.time()
        db_now, user = float(row[0]), str(row[1])
        found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        missing = [
            table
            for table in _TABLES
            if not conn.execute(
                "SELECT has_table_privilege(current_user, CAST(? AS TEXT), CAST(? AS TEXT))",
                (table, _PRIVILEGES),
            ).fetchone()[0]
        ]
    skew = db_now - (started + ended) / 2
    problems = []
    if found != SCHEMA_VERSION:
        problems.append(
            f"schema version {found}, this dicom-node needs {SCHEMA_VERSION}"
            " (start the node once to create or upgrade it)"
        )
    if missing:
        problems.append(f"{user} lacks {_PRIVILEGES} on {', '.join(missing)}")
    if abs(skew) > CLOCK_SKEW_LIMIT_S:
        problems.append(f"this host's clock is {-skew:+.1f} s off the database's (run NTP)")
    detail = (
        f"{user}, schema {found}, clock {-skew:+.3f} s against the database"
        if not problems
        else "; ".join(problems)
    )
    return CheckLine("postgresql", not problems, detail)


def check_broker(config: NodeConfig, algorithms: Sequence[str]) -> CheckLine:
    app = celery_app(config.cluster, algorithms)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=5)
        channel = connection.channel()
        try:
            for queue in queues(algorithms):
                queue(channel).declare()
        finally:
            channel.close()
    names = ", ".join(q.name for q in queues(algorithms)) or "no algorithm installed"
    return CheckLine("rabbitmq", True, f"connected; queues {names}")


def check_objects(config: NodeConfig) -> CheckLine:
    from dicom_node.objects import object_store

    store = object_store(config.cluster.objects)
    prefix = f"cluster-check/{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    body = uuid.uuid4().bytes
    try:
        store.put_bytes(f"{prefix}/probe", body)
        if store.get_bytes(f"{prefix}/probe") != body:
            return CheckLine("objects", False, f"{prefix}/probe read back different bytes")
    finally:
        store.delete_prefix(prefix)
    return CheckLine("objects", True, f"{config.cluster.objects.url}: put, get and delete work")


def cluster_checks(config: NodeConfig, algorithms: Sequence[str]) -> list[CheckLine]:
    """Every check, each answering even when another failed; a note on the time limits."""
    lines = [
        _guarded("postgresql", lambda: check_database(config)),
        _guarded("rabbitmq", lambda: check_broker(config, algorithms)),
        _guarded("objects", lambda: check_objects(config)),
    ]
    return lines


def limits_note(config: NodeConfig) -> str | None:
    """The consumer_timeout warning for this host's algorithms' time limits, if any."""
    from dicom_node.infer import time_limits
    from dicom_node.plugins import discover

    return time_limit_warning(time_limits(config, discover()))
