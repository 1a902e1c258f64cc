"""Webhook notifications: a POST of one JSON document per job and destination, signed.

The document follows ``dicom_node/schemas/webhook.schema.json`` (JSON Schema 2020-12), which
ships with the package (:func:`schema`). It is the same, byte for byte, on every attempt of one
delivery; its ``id`` (also the ``Idempotency-Key`` header) tells a receiver that a second POST
is a resend of one it has.

Signature (HMAC-SHA256, RFC 2104, keyed with the destination's ``secret``)::

    X-Dicom-Node-Timestamp: <Unix seconds of this attempt>
    X-Dicom-Node-Signature: sha256=<hex HMAC of "<timestamp>.<body bytes>">

A receiver recomputes the HMAC over the timestamp header, a full stop and the raw body,
compares it in constant time, and refuses a timestamp older than it allows (five minutes,
say): the signature binds the time, so a recorded request cannot be replayed later
(:func:`verify` is the reference implementation).

Answers: 2xx is sent; 408, 429, 5xx, a timeout or a connection error is tried again; any
other status (a 4xx, or a redirect, which is not followed) is refused for good.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from functools import cache
from importlib import resources
from typing import Any

from dicom_node.config import WebhookDestination
from dicom_node.errors import DestinationUnavailable
from dicom_node.notify import Code, Report

__all__ = [
    "SCHEMA_ID",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "document",
    "schema",
    "send_webhook",
    "sign",
    "verify",
]

SCHEMA_ID = "https://dicom-node.invalid/schemas/webhook/1"
SIGNATURE_HEADER = "X-Dicom-Node-Signature"
TIMESTAMP_HEADER = "X-Dicom-Node-Timestamp"


@cache
def schema() -> dict[str, Any]:
    """The webhook document's JSON Schema, as shipped in the package."""
    text = resources.files("dicom_node").joinpath("schemas/webhook.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _code(code: Code | None) -> dict[str, str] | None:
    if code is None:
        return None
    return {"scheme": code.scheme, "value": code.value, "meaning": code.meaning}


def document(report: Report) -> dict[str, Any]:
    """The JSON document of ``report`` (webhook.schema.json)."""
    study = report.study
    return {
        "schema": SCHEMA_ID,
        "id": report.key,
        "node": {"ae_title": report.node_ae_title},
        "job": {"id": report.job_id, "priority": report.priority},
        "algorithm": {"name": report.algorithm, "version": report.version, "demo": report.demo},
        "demo_warning": report.demo_warning,
        "study": {
            "study_instance_uid": study.study_uid,
            "accession_number": study.accession_number,
            "patient_id": study.patient_id,
            "issuer_of_patient_id": study.issuer_of_patient_id,
            "patient_name": study.patient_name,
            "modality": study.modality,
            "study_date": study.study_date,
        },
        "positive": report.positive,
        "findings": [
            {
                "label": f.label,
                "finding": _code(f.finding),
                "site": _code(f.site),
                "positive": f.positive,
                "change": _code(f.change),
                "measurements": [
                    {
                        "concept": _code(m.concept),
                        "value": m.value,
                        "unit": _code(m.unit),
                        "qualifier": m.qualifier,
                    }
                    for m in f.measurements
                ],
            }
            for f in report.findings
        ],
        "results": [
            {
                "kind": o.kind,
                "sop_class_uid": o.sop_class_uid,
                "sop_instance_uid": o.sop_instance_uid,
                "series_instance_uid": o.series_uid,
                "wado_rs_path": report.wado_rs_path(o),
            }
            for o in report.objects
        ],
    }


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC of timestamp "." body."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance_s: float = 300.0,
) -> bool:
    """What a receiver checks: the signature over timestamp and body, and a timestamp no
    further than ``tolerance_s`` from its clock."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def body_of(report: Report) -> bytes:
    """The bytes POSTed: compact, keys in a fixed order, the same on every attempt."""
    return json.dumps(document(report), separators=(",", ":"), ensure_ascii=False).encode()


def send_webhook(target: WebhookDestination, report: Report, timeout_s: float) -> None:
    """POST ``report`` to the webhook; raises :class:`DeliveryError` unless a 2xx came back."""
    import requests

    from dicom_node.deliver import http_status_error, requests_verify

    body = body_of(report)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": report.key,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(target.secret, timestamp, body),
        "User-Agent": "dicom-node",
    }
    try:
        response = requests.post(
            target.url,
            data=body,
            headers=headers,
            timeout=timeout_s,
            verify=requests_verify(target.verify),
            allow_redirects=False,  # a redirected POST becomes a GET: a misconfigured URL
        )
    except requests.RequestException as exc:
        raise DestinationUnavailable(f"webhook {target.url}: {type(exc).__name__}: {exc}") from exc
    status = response.status_code
    if 200 <= status < 300:
        return
    raise http_status_error(f"webhook {target.url}", status)
