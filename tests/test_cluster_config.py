"""The ``cluster:`` section: cluster mode is on exactly when a database URL is set, and then
needs a broker and an object store; secrets come from the environment."""

from __future__ import annotations

import pytest

from dicom_node.config import load_config
from dicom_node.errors import ConfigError

_COMPLETE = {
    "DICOM_NODE__CLUSTER__DATABASE_URL": "postgresql://dicom_node:secret@db:5432/dicom_node",
    "DICOM_NODE__CLUSTER__BROKER_URL": "amqp://guest:guest@mq:5672//",
    "DICOM_NODE__CLUSTER__OBJECTS__URL": "s3://dicom-node/site-a",
}


@pytest.mark.unit
def test_embedded_by_default() -> None:
    config = load_config(environ={})
    assert not config.cluster.enabled
    assert config.cluster.database_url is None


@pytest.mark.unit
def test_cluster_mode_from_the_environment() -> None:
    config = load_config(
        environ={
            **_COMPLETE,
            "DICOM_NODE__CLUSTER__OBJECTS__ACCESS_KEY_ID": "key",
            "DICOM_NODE__CLUSTER__OBJECTS__SECRET_ACCESS_KEY": "very-secret",
            "DICOM_NODE__CLUSTER__LEASE_S": "30",
        }
    )
    assert config.cluster.enabled
    assert config.cluster.database_url == _COMPLETE["DICOM_NODE__CLUSTER__DATABASE_URL"]
    assert config.cluster.objects.secret_access_key == "very-secret"
    assert config.cluster.lease_s == 30.0
    # The secret stays out of reprs that end up in logs and tracebacks.
    assert "very-secret" not in repr(config.cluster)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ("DICOM_NODE__CLUSTER__BROKER_URL", "cluster.broker_url: required in cluster mode"),
        ("DICOM_NODE__CLUSTER__OBJECTS__URL", "cluster.objects.url: required in cluster mode"),
    ],
)
def test_cluster_mode_needs_broker_and_objects(drop: str, named: str) -> None:
    environ = {k: v for k, v in _COMPLETE.items() if k != drop}
    with pytest.raises(ConfigError, match=named):
        load_config(environ=environ)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("DATABASE_URL", "mysql://db/x", "cluster.database_url"),
        ("BROKER_URL", "redis://mq", "cluster.broker_url"),
        ("OBJECTS__URL", "http://bucket", "cluster.objects.url"),
        ("LEASE_S", "0", "cluster.lease_s"),
        ("OBJECTS__ACCESS_KEY_ID", "alone", "cluster.objects"),
    ],
)
def test_bad_cluster_values_are_named(key: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(environ={**_COMPLETE, f"DICOM_NODE__CLUSTER__{key}": value})


@pytest.mark.unit
def test_a_shared_folder_is_an_object_store() -> None:
    config = load_config(
        environ={**_COMPLETE, "DICOM_NODE__CLUSTER__OBJECTS__URL": "file:///mnt/shared/node"}
    )
    assert config.cluster.objects.url == "file:///mnt/shared/node"
