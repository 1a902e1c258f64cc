"""Webhook notifications: the documented JSON (validated against the shipped schema), signed
with HMAC-SHA256, through the node's delivery states to a real HTTP receiver: an outage
delivers exactly once after it, a refusal is one dead letter that a replay delivers."""

from __future__ import annotations

import time
from functools import partial

import jsonschema
import pytest

from dicom_node.config import NodeConfig, NotifyRule, WebhookDestination
from dicom_node.errors import DestinationRefused, DestinationUnavailable
from dicom_node.notify import notified_priority, selected
from dicom_node.notify_webhook import body_of, document, schema, send_webhook, sign, verify
from tests.support.http import request
from tests.support.node import wait_until
from tests.support.notify import (
    WebhookReceiver,
    cxr_report_for,
    cxr_results,
    delivery_attempts,
    delivery_row,
    notify_node,
    report_of,
    send_ct,
    wait_for_delivery,
)

SECRET = "s3cret-s3cret-s3cret"


def validate(doc: dict) -> None:
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)


cxr_report = partial(cxr_report_for, job_id=3, destination="hook")


@pytest.mark.unit
def test_the_schema_is_valid_and_documents_follow_it(tmp_path) -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    positive = document(cxr_report(tmp_path / "p", 0.91, rule=NotifyRule(positive_priority="stat")))
    validate(positive)
    assert positive["positive"] is True and positive["job"]["priority"] == "stat"
    assert positive["study"]["accession_number"] == "ACC-0042"
    assert positive["study"]["patient_id"] == "PAT-7"
    assert positive["study"]["patient_name"] == "Doe^Jane"
    assert positive["algorithm"] == {"name": "pneumonia-cxr", "version": "1.0", "demo": True}
    assert positive["demo_warning"] == "DEMO MODEL - NOT FOR CLINICAL USE"
    (finding,) = positive["findings"]
    assert finding["finding"] == {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"}
    assert finding["positive"] is True
    assert finding["measurements"][0]["value"] == pytest.approx(0.91)
    assert [r["kind"] for r in positive["results"]] == ["SR"]

    negative = document(cxr_report(tmp_path / "n", 0.2, demo=False))
    validate(negative)
    assert negative["positive"] is False and negative["findings"][0]["positive"] is False
    assert negative["demo_warning"] is None and negative["algorithm"]["demo"] is False
    assert negative["job"]["priority"] == "routine"

    broken = {**negative, "positive": "yes"}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


@pytest.mark.unit
def test_signature_binds_body_and_time(tmp_path) -> None:
    body = body_of(cxr_report(tmp_path, 0.9))
    now = 1_800_000_000
    signature = sign(SECRET, str(now), body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(SECRET, str(now), body, signature, now=now + 10)
    assert not verify(SECRET, str(now), body + b" ", signature, now=now)
    assert not verify(SECRET, str(now + 1), body, signature, now=now)
    assert not verify("another-secret-0000", str(now), body, signature, now=now)
    assert not verify(SECRET, str(now), body, signature, now=now + 301)  # a replay, later


@pytest.mark.unit
def test_the_body_and_key_are_the_same_on_every_attempt(tmp_path) -> None:
    objects, source = cxr_results(tmp_path, probability=0.8)
    made = [
        report_of(objects, source, job_id=3, destination=name) for name in ("hook", "hook", "other")
    ]
    assert body_of(made[0]) == body_of(made[1])
    assert made[0].key == made[1].key != made[2].key


@pytest.mark.unit
def test_notify_rules_choose_results_and_their_priority() -> None:
    rule = NotifyRule(only_positive=True, priorities=["stat", "urgent"], algorithms=["a"])
    assert selected(rule, "a", "stat", positive=True)
    assert not selected(rule, "a", "stat", positive=False)
    assert not selected(rule, "b", "stat", positive=True)
    assert not selected(rule, "a", "routine", positive=True)
    assert selected(NotifyRule(), "b", "routine", positive=False)
    raise_to = NotifyRule(positive_priority="urgent")
    assert notified_priority("routine", True, raise_to) == "urgent"
    assert notified_priority("stat", True, raise_to) == "stat"  # never lowered
    assert notified_priority("routine", False, raise_to) == "routine"


@pytest.mark.unit
@pytest.mark.parametrize(
    "notify",
    [{"priorities": []}, {"priorities": ["asap"]}, {"algorithms": []}, {"only_positive": "x"}],
)
def test_bad_notify_rules_are_refused_at_construction(notify) -> None:
    with pytest.raises(ValueError, match="notify"):
        NodeConfig.model_validate(
            {
                "destinations": {
                    "hook": {
                        "type": "webhook",
                        "url": "http://x/",
                        "secret": SECRET,
                        "notify": notify,
                    }
                }
            }
        )


@pytest.mark.unit
def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        WebhookDestination(url="http://x/", secret="short")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (204, None),
        (400, DestinationRefused),
        (404, DestinationRefused),
        (408, DestinationUnavailable),
        (429, DestinationUnavailable),
        (500, DestinationUnavailable),
        (503, DestinationUnavailable),
    ],
)
def test_answers_decide_sent_retried_or_dead(tmp_path, status, kind) -> None:
    receiver = WebhookReceiver(SECRET).start()
    try:
        receiver.status = status
        target = WebhookDestination(url=receiver.url, secret=SECRET)
        report = cxr_report(tmp_path, 0.9)
        if kind is None:
            send_webhook(target, report, timeout_s=5)
            (doc,) = receiver.documents()
            validate(doc)
        else:
            with pytest.raises(kind, match=f"HTTP {status}"):
                send_webhook(target, report, timeout_s=5)
        assert receiver.got.bad_signatures == 0
    finally:
        receiver.stop()


@pytest.mark.integration
def test_a_receiver_that_is_down_is_retried() -> None:
    receiver = WebhookReceiver(SECRET)  # never started: connection refused
    target = WebhookDestination(url=receiver.url, secret=SECRET)
    with pytest.raises(DestinationUnavailable, match="ConnectionError"):
        send_webhook(target, _any_report(), timeout_s=2)


def _any_report():
    import tempfile
    from pathlib import Path

    return cxr_report(Path(tempfile.mkdtemp()), 0.9)


@pytest.mark.integration
@pytest.mark.slow
def test_an_outage_then_exactly_once_through_a_node(make_node, tmp_path) -> None:
    receiver = WebhookReceiver(SECRET)  # down at first
    node = notify_node(make_node, {"type": "webhook", "url": receiver.url, "secret": SECRET})
    send_ct(node, tmp_path / "ct")
    wait_until(
        lambda: (row := delivery_row(node)) is not None and row["attempts"] >= 2,
        120,
        "failed attempts while the receiver is down",
        node.log(),
    )
    assert delivery_row(node)["state"] == "pending"
    receiver.start()
    try:
        wait_for_delivery(node, "sent", 60, "sent")
        time.sleep(1.0)  # nothing more comes
        (doc,) = receiver.documents()
        validate(doc)
        assert list(receiver.got.keys.values()) == [1]
        assert doc["positive"] is True and doc["algorithm"]["name"] == "example-threshold"
        assert {r["kind"] for r in doc["results"]} == {"SEG", "SR"}
        outputs = {r["sop_instance_uid"] for r in node.query("SELECT * FROM outputs")}
        assert {r["sop_instance_uid"] for r in doc["results"]} == outputs
        for result in doc["results"]:  # what the document says is where the node serves it
            status, body = request(node.http_url + result["wado_rs_path"])
            assert status == 200 and result["sop_instance_uid"].encode() in body
        assert node.stop() == 0
        audited = delivery_attempts(node.data_dir / "audit" / "audit.jsonl", receiver.url)
        outcomes = [m["EventIdentification"]["EventOutcomeIndicator"] for m in audited]
        assert outcomes[-1] == 0 and outcomes.count(0) == 1 and len(outcomes) >= 3
        assert set(outcomes[:-1]) == {4}  # each failed attempt, then the one that worked
    finally:
        receiver.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_refusal_is_a_dead_letter_that_a_replay_delivers(make_node, tmp_path) -> None:
    receiver = WebhookReceiver(SECRET).start()
    receiver.status = 422
    try:
        node = notify_node(make_node, {"type": "webhook", "url": receiver.url, "secret": SECRET})
        send_ct(node, tmp_path / "ct")
        row = wait_for_delivery(node, "dead", 120, "dead")
        assert row["attempts"] == 1 and "HTTP 422" in row["last_error"]
        receiver.status = 200
        replay = node.cli("jobs", "retry", str(row["job_id"]))
        assert replay.returncode == 0, replay.stderr
        wait_for_delivery(node, "sent", 60, "sent after replay")
        assert list(receiver.got.keys.values()) == [1]
        validate(receiver.documents()[0])
    finally:
        receiver.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_rule_that_leaves_the_result_out_sends_nothing(make_node, tmp_path) -> None:
    receiver = WebhookReceiver(SECRET).start()
    try:
        node = notify_node(
            make_node,
            {
                "type": "webhook",
                "url": receiver.url,
                "secret": SECRET,
                "notify": {"algorithms": ["pneumonia-cxr"]},
            },
        )
        send_ct(node, tmp_path / "ct")
        wait_for_delivery(node, "sent", 120, "closed")
        assert receiver.documents() == []
        assert "its notify rule leaves the result out" in node.log()
    finally:
        receiver.stop()


@pytest.mark.unit
def test_a_damaged_result_is_refused_not_retried(tmp_path) -> None:
    objects, source = cxr_results(tmp_path, probability=0.9)
    objects[0].path.write_bytes(b"not DICOM at all")
    with pytest.raises(DestinationRefused, match="cannot be read"):
        report_of(objects, source, job_id=3, destination="hook")
