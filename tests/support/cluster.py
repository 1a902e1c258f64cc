"""A cluster for tests: its ``cluster:`` settings on the real servers the suite starts
(tests/support/postgres.py, rabbitmq.py, seaweedfs.py), and cluster workers started as
processes of their own, each a "host" with its own name and scratch folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support.node import plugin_env
from tests.support.seaweedfs import SeaweedServer


def cluster_settings(
    database_url: str, broker_url: str, seaweedfs: SeaweedServer, **more: Any
) -> dict[str, Any]:
    """The ``cluster:`` section of a cluster on these servers: a fresh bucket of its own on
    ``seaweedfs`` (the node creates it), short leases and sweeps for tests."""
    return {
        "database_url": database_url,
        "broker_url": broker_url,
        "objects": seaweedfs.settings(f"s3://t{uuid.uuid4().hex[:12]}/cluster"),
        "lease_s": 5.0,
        "redispatch_s": 3.0,
        "sweep_interval_s": 0.2,
        **more,
    }


def worker_log(scratch: Path) -> Path:
    """Where :func:`start_cluster_worker` writes the worker's output (beside its scratch)."""
    return scratch.with_name(f"{scratch.name}.log")


def start_cluster_worker(
    config_path: Path,
    name: str,
    scratch: Path,
    *,
    processes: int = 1,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> subprocess.Popen[bytes]:
    """``dicom-node worker --cluster`` as a host of its own: a new process group (kill -9 of
    the group is the host's power cut; SIGSTOP of it a frozen host), its own ``name`` (its
    children are ``name-0``, ``name-1``...) and scratch folder, the example plugin installed.
    Returns once every child has registered ("ready on" in its log, :func:`worker_log`)."""
    scratch.mkdir(parents=True, exist_ok=True)
    log_path = worker_log(scratch)
    seen = len(log_path.read_text(errors="replace")) if log_path.exists() else 0
    environ = {
        **plugin_env(),
        **(env or {}),
        "DICOM_NODE__CLUSTER__SCRATCH_DIR": str(scratch),
    }
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicom_node",
                "worker",
                "--cluster",
                "--config",
                str(config_path),
                "--name",
                name,
                "--processes",
                str(processes),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")[seen:]
        if proc.poll() is not None:
            raise RuntimeError(f"cluster worker {name} exited at start:\n{text[-5000:]}")
        if text.count(" ready on ") >= processes:
            return proc
        time.sleep(0.1)
    stop_cluster_worker(proc)
    raise RuntimeError(f"cluster worker {name} did not start:\n{log_path.read_text()[-5000:]}")


def stop_cluster_worker(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM (Celery's warm shutdown: the job in hand finishes), then SIGKILL of the whole
    host's process group if it did not end in ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    kill_cluster_worker(proc)
    return proc.returncode


def kill_cluster_worker(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 of the host's process group: the Celery parent and its children at once."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
