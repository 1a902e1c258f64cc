"""The notification destinations in the configuration: written as an administrator would (YAML,
the secret from the environment), and refused with the key named when wrong."""

from __future__ import annotations

import pytest
import yaml

from dicom_node.config import FhirDestination, Hl7Destination, WebhookDestination, load_config
from dicom_node.deliver import target_label
from dicom_node.errors import ConfigError

YAML = """
destinations:
  ris: {type: hl7, host: ris.example, port: 2575, receiving_application: RIS,
        notify: {only_positive: true, priorities: [stat, urgent]}}
  ehr: {type: fhir, url: "https://ehr.example/fhir", token: abc}
  hook: {type: webhook, url: "https://hooks.example/ai", notify: {positive_priority: stat}}
routing:
  destinations: [ris, ehr, hook]
"""


@pytest.mark.unit
def test_three_notification_destinations_from_yaml_and_the_environment(tmp_path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(YAML)
    secret = "from-the-environment-0123"
    config = load_config(path, environ={"DICOM_NODE__DESTINATIONS__HOOK__SECRET": secret})
    ris, ehr, hook = (config.destinations[n] for n in ("ris", "ehr", "hook"))
    assert isinstance(ris, Hl7Destination) and ris.notify.only_positive
    assert ris.notify.priorities == ["stat", "urgent"] and ris.ack_timeout_s == 30
    assert isinstance(ehr, FhirDestination) and ehr.identifier_system == "urn:dicom-node:job"
    assert isinstance(hook, WebhookDestination) and hook.secret == secret
    assert secret not in repr(hook) and "abc" not in repr(ehr)  # secrets stay out of logs
    assert target_label(ris) == "RIS@ris.example:2575"
    assert target_label(ehr) == "https://ehr.example/fhir"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("destination", "key"),
    [
        ({"type": "webhook", "url": "https://x/"}, "destinations.d.webhook.secret"),
        ({"type": "webhook", "url": "ftp://x/", "secret": "s" * 16}, "destinations.d.webhook.url"),
        ({"type": "hl7", "host": "h", "port": 0, "receiving_application": "R"}, "port"),
        ({"type": "hl7", "host": "h", "port": 1}, "receiving_application"),
        ({"type": "fhir", "url": "https://x", "notify": {"positive_priority": "asap"}}, "notify"),
        ({"type": "sms", "number": "1"}, "destinations.d"),
    ],
)
def test_bad_destinations_are_refused_naming_the_key(tmp_path, destination, key) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"destinations": {"d": destination}}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, environ={})
