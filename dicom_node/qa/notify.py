"""qa's notification check: the phantoms' results reached the node's notification
destinations (webhook, hl7, fhir) that their routes name.

The qa run's phantoms are routed as any study, so a route that notifies a RIS, an EHR or a
webhook tells it of the phantom's result too: that is the commissioning test of that path.
qa cannot see the receiver, so it asks the node: its HTTP API (``/api/studies/<uid>``, with
``http.token``) lists each job's deliveries; each notification delivery of the phantom's
study is a PASS once sent, a FAIL when dead or still pending at the deadline (with the
delivery's last error, e.g. an HL7 AR or an HTTP 401). A node whose HTTP service is off gives
a SKIP. A delivery that the destination's ``notify`` rule left out is sent with no message;
its row says so only through the node's log, since the API does not tell them apart.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from dicom_node.config import FhirDestination, Hl7Destination, NodeConfig, WebhookDestination
from dicom_node.deliver import target_label
from dicom_node.qa.report import Check

__all__ = ["notification_checks", "notified_destinations"]

_NOTIFY = (WebhookDestination, Hl7Destination, FhirDestination)


def notified_destinations(config: NodeConfig, names: set[str]) -> list[str]:
    """The notification destinations among ``names``, sorted."""
    return sorted(n for n in names if isinstance(config.destinations.get(n), _NOTIFY))


def _api(config: NodeConfig, host: str) -> tuple[str, ssl.SSLContext | None]:
    listen = config.http.host
    where = host if listen in ("0.0.0.0", "::", "") else listen
    tls = config.http.tls
    if not tls.enabled:
        return f"http://{where}:{config.http.port}", None
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls.ca_file is not None else None
    )
    return f"https://{where}:{config.http.port}", context


def _deliveries(
    url: str, token: str | None, context: ssl.SSLContext | None
) -> list[dict[str, Any]] | str:
    """The study's deliveries by the API, or why they could not be read."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            study = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []  # not stored yet
        return f"the node's API answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"the node's API cannot be read: {exc}"
    return [d for job in study.get("jobs", []) for d in job.get("deliveries", [])]


def notification_checks(
    config: NodeConfig,
    studies: Mapping[str, tuple[str, set[str]]],
    host: str,
    deadline: float,
) -> list[Check]:
    """One check per phantom and notification destination its routes name. ``studies``:
    algorithm -> (the phantom's Study Instance UID, its routes' destination names)."""
    wanted = {
        algorithm: (uid, notified_destinations(config, names))
        for algorithm, (uid, names) in studies.items()
    }
    wanted = {a: w for a, w in wanted.items() if w[1]}
    if not wanted:
        return []
    if not config.http.enabled:
        return [
            Check(a, f"notified {n}", "SKIP", "http.enabled is false: qa reads deliveries by /api")
            for a, (_, names) in wanted.items()
            for n in names
        ]
    base, context = _api(config, host)
    checks: list[Check] = []
    for algorithm, (uid, names) in wanted.items():
        url = f"{base}/api/studies/{uid}"
        while True:
            found = _deliveries(url, config.http.token, context)
            if isinstance(found, str):
                break
            mine = [d for d in found if d["destination"] in names]
            done = {d["destination"] for d in mine if d["state"] in ("sent", "dead")}
            if done >= set(names) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        for name in names:
            checks.append(_check(config, algorithm, name, found))
    return checks


def _check(
    config: NodeConfig, algorithm: str, name: str, found: list[dict[str, Any]] | str
) -> Check:
    title = f"notified {name}"
    where = target_label(config.destinations[name])
    if isinstance(found, str):
        return Check(algorithm, title, "FAIL", found)
    mine = [d for d in found if d["destination"] == name]
    if not mine:
        return Check(algorithm, title, "FAIL", f"no delivery to {where} was recorded")
    worst = next((d for state in ("dead", "pending") for d in mine if d["state"] == state), mine[0])
    tries = f"{worst['attempts']} attempt(s)"
    if worst["state"] == "sent":
        return Check(algorithm, title, "PASS", f"{where} took the result ({tries})")
    why = worst.get("last_error") or "no answer yet"
    if worst["state"] == "dead":
        return Check(algorithm, title, "FAIL", f"dead letter after {tries}: {why}")
    return Check(algorithm, title, "FAIL", f"not sent in time ({tries}): {why}")
