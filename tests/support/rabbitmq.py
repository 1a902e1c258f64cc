"""A real RabbitMQ server for tests, started in a temporary folder on 127.0.0.1.

Debian's ``rabbitmq-server`` (not auto-started: ``make system-deps`` installs it). As root its
scripts switch to the ``rabbitmq`` user, so the folder is given to that user. Every port (AMQP,
Erlang distribution, epmd) is a free one, so that several servers and other tests run side by
side. :meth:`RabbitServer.kill` is a kill -9 of the broker; :meth:`start` again keeps its data
(durable queues and persistent messages survive), :meth:`wipe` throws the data away (a broker
replaced by an empty one: the node's sweeper must publish again).

The ``rabbitmq`` fixture is one server per session; import it into a test module to use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.testing import free_port

# Long enough for the suite's slowest job; the workers' hard time limit stays below it.
CONSUMER_TIMEOUT_MS = 600_000


def rabbitmq_installed() -> bool:
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


def _script(name: str) -> str:
    """Debian's script itself, not the /usr/sbin wrapper: as root the wrapper runs it through
    ``su``, whose new session a kill of our process group would not reach."""
    inner = Path("/usr/lib/rabbitmq/bin") / name
    return str(inner) if inner.exists() else name


def _as_broker_user() -> dict[str, Any]:
    """Popen arguments that run a command as ``rabbitmq`` when we are root (RabbitMQ refuses
    to run as root), else as ourselves."""
    if os.geteuid() != 0:
        return {}
    return {"user": "rabbitmq", "group": "rabbitmq", "extra_groups": []}


class RabbitServer:
    """One RabbitMQ node with its own data folder and ports: ``start``, ``stop``, ``kill``
    (-9), ``start`` again with its data, ``wipe`` (its data gone) then ``start``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        # A node name of its own: rabbitmqctl finds the node by it through its epmd.
        self.node = f"t{uuid.uuid4().hex[:10]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        # Our own epmd on our own port, so that nothing of the broker outlives close(): one
        # the Erlang VM started would detach itself (epmd -daemon).
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The AMQP URL of the default virtual host (guest may connect from anywhere here)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_path(self) -> Path:
        return self.folder / "log"

    @property
    def pid_file(self) -> Path:
        return self.folder / "pid"

    def _env(self) -> dict[str, str]:
        d = self.folder
        return {
            **os.environ,
            "HOME": str(d / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_path),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    def _prepare(self) -> None:
        d = self.folder
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
            # A test machine's disk may be fuller than the default 50 MB watermark allows.
            "disk_free_limit.absolute = 1MB\n"
        )
        (d / "enabled_plugins").write_text("[].\n")
        # The erlang cookie lives in HOME; the scripts run as rabbitmq when started as root.
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(d)], check=True)

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """rabbitmqctl against this node; its output (raises when it fails)."""
        result = subprocess.run(
            [_script("rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            cwd=self.folder,
            **_as_broker_user(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr}{result.stdout}")
        return result.stdout

    def start(self, timeout_s: float = 90) -> RabbitServer:
        """Start the broker (with whatever data its folder has) and wait until it serves."""
        self._prepare()
        self.pid_file.unlink(missing_ok=True)
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port)],
                env=self._env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        out = (self.folder / "server.out").open("ab")
        self.proc = subprocess.Popen(
            [_script("rabbitmq-server")],
            env=self._env(),
            cwd=self.folder,  # where a crash dump goes
            **_as_broker_user(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a kill of the group takes epmd and beam together
        )
        out.close()
        deadline = time.monotonic() + timeout_s
        while not self.pid_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ did not start:\n{self.output()}")
            time.sleep(0.2)
        self.ctl("wait", str(self.pid_file), "--timeout", str(int(timeout_s)), timeout_s=timeout_s)
        return self

    def output(self) -> str:
        path = self.folder / "server.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        """An orderly stop (messages and queues kept)."""
        if self.proc is None:
            return
        try:
            self.ctl("stop", timeout_s=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()
            return
        self._reap()

    def kill(self) -> None:
        """kill -9 of the broker and its epmd (a host that lost power); the data stays."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it died already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def wipe(self) -> None:
        """Throw the broker's data away (stopped first): queues and messages are gone."""
        if self.proc is not None:
            self.kill()
        shutil.rmtree(self.folder / "mnesia", ignore_errors=True)

    def close(self) -> None:
        self.kill()
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def server_folder() -> Path:
    """A new folder for a server, in the system's temporary folder: pytest's own is readable
    by its user alone, and as root the broker runs as ``rabbitmq``."""
    return Path(tempfile.mkdtemp(prefix="dicom-node-rabbitmq-"))


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitServer]:
    """One RabbitMQ for the test session, skipped where it is not installed (CI must have it).
    A test that kills or wipes a broker starts its own (``RabbitServer(server_folder())``)."""
    if not rabbitmq_installed():
        message = "RabbitMQ is not installed (make system-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RabbitServer(server_folder()).start()
    try:
        yield server
    finally:
        server.close()
