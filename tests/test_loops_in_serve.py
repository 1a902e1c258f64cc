"""A serve process whose database is locked under it (issue 16, item 5): its loops back off
and say so in /readyz and /metrics, and carry on when the lock goes.

The lock is real: this test holds ``BEGIN EXCLUSIVE`` on the node's index, so every write the
node tries waits its busy timeout (10 s) and fails with "database is locked". The router's
claim is a write, and so is the supervisor's returning of a dead worker's job: the worker is
killed while the lock is held, so the supervisor meets the lock too.
"""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest

from dicom_node.database import database_path
from tests.support.http import get_json, metrics
from tests.support.node import wait_until

pytestmark = pytest.mark.integration


def test_router_and_supervisor_back_off_while_the_database_is_locked(make_node) -> None:
    node = make_node()
    url = node.http_url
    wait_until(lambda: get_json(url + "/readyz")[0] == 200, what="readiness", log=node.log())
    (worker,) = [w for w in get_json(url + "/api/workers")[1] if w["alive"]]

    holder = sqlite3.connect(database_path(node.data_dir), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        os.kill(worker["pid"], signal.SIGKILL)

        def backing_off() -> dict | None:
            status, report = get_json(url + "/readyz")
            loops = report["checks"]["loops"]
            wanted = ("router backing off", "worker-supervisor backing off")
            return report if status == 503 and all(w in loops for w in wanted) else None

        report = wait_until(backing_off, timeout_s=90, what="loops backing off", log=node.log())
        assert "database is locked" in report["checks"]["loops"]
        assert report["checks"]["index"] == "ok"  # readers go on (WAL)
        seen = metrics(url)
        for loop in ("router", "worker-supervisor"):
            assert seen[("dicom_node_loop_backing_off", (("loop", loop),))] == 1
            assert seen[("dicom_node_loop_failures_total", (("loop", loop),))] >= 1
        assert seen[("dicom_node_loop_backing_off", (("loop", "deliverer"),))] == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    # The lock gone, the loops recover by themselves: the dead worker's job is returned, a
    # new worker started, and the node is ready again.
    wait_until(
        lambda: get_json(url + "/readyz")[0] == 200, timeout_s=90, what="ready", log=node.log()
    )
    seen = metrics(url)
    for loop in ("router", "worker-supervisor"):
        assert seen[("dicom_node_loop_backing_off", (("loop", loop),))] == 0
        assert seen[("dicom_node_loop_last_success_timestamp", (("loop", loop),))] > 0
    log = node.log()
    for loop in ("router", "worker-supervisor"):
        # Once when it failed, however often it tried; once when it recovered.
        assert log.count(f"{loop} loop failed: OperationalError: database is locked") == 1
        assert f"{loop} loop recovered" in log
    assert "Traceback" not in log
    assert node.stop() == 0
