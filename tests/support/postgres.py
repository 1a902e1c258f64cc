"""A real PostgreSQL server for tests, started in a temporary folder on 127.0.0.1.

PostgreSQL refuses to run as root (CI runs as root), so as root the server runs as the
``postgres`` user that Debian's package creates; otherwise as the current user. Each test gets
a fresh database of its own (:meth:`PostgresServer.fresh_url`) on one server per session
(:func:`postgres_server`, a session fixture: import it into a test module to use it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dicom_node.testing import free_port


def postgres_bin() -> Path | None:
    """Where Debian's PostgreSQL binaries are (the newest major version), if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@dataclass
class PostgresServer:
    """One PostgreSQL cluster: ``start``, ``stop``, ``kill`` (-9), ``start`` again with its data."""

    folder: Path
    port: int = 0
    bin: Path = field(default_factory=lambda: postgres_bin() or Path("/nonexistent"))

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "log"

    def _run(self, *command: str, timeout_s: float = 60) -> None:
        line = " ".join(shlex.quote(c) for c in command)
        if os.geteuid() == 0:
            argv = ["su", "postgres", "-s", "/bin/sh", "-c", line]
        else:
            argv = ["/bin/sh", "-c", line]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{command[0]} failed ({result.returncode}): {result.stderr}{result.stdout}\n{log}"
            )

    def start(self) -> PostgresServer:
        """Create the cluster on first start; start it (on the same port again after a stop)."""
        if not (self.bin / "pg_ctl").exists():
            raise RuntimeError("PostgreSQL is not installed (make system-deps)")
        if not self.port:
            self.port = free_port()
        if not self.data.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres")
            initdb = str(self.bin / "initdb")
            self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres")
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log),
            "-w", "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """A fast shutdown: connections are closed, the data kept."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        return int(pidfile.read_text().split()[0])

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash): its backends exit on their own; the data stays.
        The stale pid file is removed so that ``start`` does not wait on it."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            subprocess.run(["sleep", "0.05"], check=False)
        (self.data / "postmaster.pid").unlink(missing_ok=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def fresh_url(self) -> str:
        """A new, empty database on this server: one per test, so tests never share rows."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        if self.pid() is not None:
            try:
                self.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session, skipped where PostgreSQL is not installed
    (``make system-deps`` installs it; CI has it)."""
    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed, and CI must run these tests")
        pytest.skip("PostgreSQL is not installed (make system-deps)")
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="dicom-node-pg-")))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for one test."""
    return postgres_server.fresh_url()
