"""Readiness in cluster mode (issue 17): /readyz checks PostgreSQL (schema current), RabbitMQ
and the object store, each its own check naming the server's host:port (never credentials)
with the reason when failing; every probe is cached a few seconds and waited for a bounded
time, so a server that does not answer never hangs the probe."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dicom_node.api import server_address
from dicom_node.config import NodeConfig
from dicom_node.database import SCHEMA_VERSION
from dicom_node.dispatch import celery_app
from dicom_node.objects import object_store
from dicom_node.store import InstanceStore
from dicom_node.testing import free_port
from dicom_node.web import CachedProbe, cluster_checks
from tests.support.cluster import cluster_settings
from tests.support.postgres import postgres_server, postgres_url
from tests.support.rabbitmq import RabbitServer, rabbitmq
from tests.support.seaweedfs import SeaweedServer

__all__ = ["postgres_server", "postgres_url", "rabbitmq"]  # the fixtures this module uses


@pytest.mark.unit
def test_server_address_keeps_host_and_port_only() -> None:
    assert server_address("postgresql://node:s3cret@db.example:5433/dicom_node") == (
        "db.example:5433"
    )
    assert server_address("amqp://guest:guest@mq:5672//") == "mq:5672"
    assert server_address("http://[::1]:8333") == "[::1]:8333"
    assert server_address("postgresql://db/x") == "db"
    assert server_address(None) is None


@pytest.mark.unit
def test_a_probe_is_cached_and_never_waited_for_beyond_its_bound() -> None:
    calls: list[int] = []
    release = threading.Event()

    def slow() -> str | None:
        calls.append(1)
        release.wait(30)
        return None

    probe = CachedProbe("slow", slow, cache_s=0.0, wait_s=0.2)
    # It does not answer: the check says so while the probe is still running, and asking
    # again does not start a second probe beside it.
    assert probe() == "no answer within 0.2 s"
    assert probe() == "no answer within 0.2 s"
    assert len(calls) == 1 and not release.is_set()
    release.set()

    asked: list[int] = []

    def counted() -> str | None:
        asked.append(1)
        return None

    cached = CachedProbe("cached", counted, cache_s=60.0, wait_s=5.0)
    assert [cached(), cached(), cached()] == [None, None, None]
    assert len(asked) == 1  # one probe, then its answer kept

    def broken() -> str | None:
        raise ConnectionRefusedError(111, "Connection refused")

    assert (
        CachedProbe("broken", broken)() == "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    with pytest.raises(ValueError):
        CachedProbe("bad", broken, wait_s=0)


def _config(tmp_path: Path, cluster: dict[str, Any]) -> NodeConfig:
    return NodeConfig.model_validate(
        {"store": {"data_dir": str(tmp_path / "data")}, "cluster": cluster}
    )


def _checks(config: NodeConfig) -> dict[str, str | None]:
    checks = cluster_checks(
        config,
        object_store(config.cluster.objects),
        celery_app(config.cluster, []),
    )
    return {name: check() for name, check in checks.items()}


@pytest.mark.integration
def test_each_server_is_its_own_check_with_its_address_and_reason(
    tmp_path: Path, postgres_url: str, rabbitmq: RabbitServer, seaweedfs: SeaweedServer
) -> None:
    cluster = cluster_settings(postgres_url, rabbitmq.url, seaweedfs)
    config = _config(tmp_path, cluster)
    # Nothing made yet: no schema in the database, no bucket in the store.
    missing = _checks(config)
    assert missing["rabbitmq"] is None
    assert missing["postgresql"] is not None and missing["postgresql"].startswith(
        f"postgresql at {server_address(postgres_url)}: "
    )
    assert missing["objects"] is not None and missing["objects"].startswith(
        f"objects at {cluster['objects']['url']} at {server_address(seaweedfs.endpoint_url)}: "
    )
    # The node made them: all three answer.
    object_store(config.cluster.objects, create=True)
    InstanceStore.for_node(config).close()
    assert _checks(config) == {"postgresql": None, "rabbitmq": None, "objects": None}

    # An older schema is named as such.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION - 1,))
    assert _checks(config)["postgresql"] == (
        f"postgresql at {server_address(postgres_url)}: schema version {SCHEMA_VERSION - 1},"
        f" this dicom-node needs {SCHEMA_VERSION}"
    )

    # Nothing listens where each server should be: each check fails on its own, with the
    # address and the reason, and no password in the words.
    closed = {
        **cluster,
        "database_url": f"postgresql://node:s3cret@127.0.0.1:{free_port()}/dicom_node",
        "broker_url": f"amqp://guest:s3cret@127.0.0.1:{free_port()}//",
        "objects": {**cluster["objects"], "endpoint_url": f"http://127.0.0.1:{free_port()}"},
    }
    down = _checks(_config(tmp_path, closed))
    for name, url in (
        ("postgresql", closed["database_url"]),
        ("rabbitmq", closed["broker_url"]),
        ("objects", closed["objects"]["endpoint_url"]),
    ):
        problem = down[name]
        assert problem is not None and f"{server_address(url)}" in problem, (name, problem)
        assert problem.startswith(f"{name} at ") and "s3cret" not in problem
    assert "Connection refused" in str(down["postgresql"])
    assert "Connection refused" in str(down["rabbitmq"])
    assert "ObjectStoreUnavailable" in str(down["objects"])
