"""Notification receivers on 127.0.0.1 and real result objects to notify of.

Each receiver is a real server of its protocol that a test can take down and bring back on the
same port (an outage), tell how to answer, and ask what it got, counted by the sender's key so
that a resend shows.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.algorithm import AlgorithmResult, Classification, Concept, SeriesInput, Weights
from dicom_node.config import NotifyRule, ResultsConfig
from dicom_node.notify import Report, ResultObject, build_report
from dicom_node.notify_webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from dicom_node.phantoms import CxrPhantomSpec, cxr_dataset
from dicom_node.write import Provenance, write_all
from tests.support.http import HttpReceiver, QuietHandler
from tests.support.node import wait_until

PNEUMONIA = Concept("SCT", "233604007", "Pneumonia")


def cxr_results(
    folder: Path, *, probability: float, demo: bool = True
) -> tuple[list[ResultObject], Path]:
    """A chest radiograph (as received) and the SR the node's writers make of a pneumonia
    classification at ``probability`` (threshold 0.5); the result objects and the source."""
    source = folder / "cxr.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds = cxr_dataset(CxrPhantomSpec(rows=64, columns=80))
    ds.AccessionNumber = "ACC-0042"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PAT-7"
    ds.save_as(source, enforce_file_format=True)
    weights = Weights(folder / "w.pt", "0" * 64, demo) if demo else Weights.none()
    result = AlgorithmResult(
        algorithm="pneumonia-cxr",
        version="1.0",
        demo=demo,
        classifications=[Classification("pneumonia", probability, 0.5, PNEUMONIA)],
    )
    provenance = Provenance("pneumonia-cxr", "1.0", weights)
    written = write_all(
        result, {"series": SeriesInput("s", (source,))}, provenance, folder / "out", ResultsConfig()
    )
    objects = [
        ResultObject(w.kind, w.sop_class_uid, w.sop_instance_uid, w.series_uid, w.path)
        for w in written
    ]
    return objects, source


def report_of(
    objects: list[ResultObject],
    source: Path,
    *,
    job_id: int,
    destination: str,
    algorithm: str = "pneumonia-cxr",
    rule: NotifyRule | None = None,
) -> Report:
    """The report the delivery loop makes of a routine job's results for ``destination``."""
    return build_report(
        job_id=job_id,
        destination=destination,
        job_algorithm=algorithm,
        job_priority="routine",
        objects=objects,
        source=source,
        node_ae_title="DICOMNODE",
        rule=rule or NotifyRule(),
    )


def cxr_report_for(
    folder: Path,
    probability: float,
    *,
    job_id: int,
    destination: str,
    demo: bool = True,
    rule: NotifyRule | None = None,
) -> Report:
    """The report of :func:`cxr_results` (made in ``folder``) for ``destination``."""
    objects, source = cxr_results(folder, probability=probability, demo=demo)
    return report_of(objects, source, job_id=job_id, destination=destination, rule=rule)


@dataclass
class _Got:
    bodies: list[bytes] = field(default_factory=list)
    keys: Counter[str] = field(default_factory=Counter)
    bad_signatures: int = 0


class WebhookReceiver(HttpReceiver):
    """An HTTP server that checks each POST's HMAC signature and answers ``status``."""

    def __init__(self, secret: str, port: int | None = None) -> None:
        super().__init__(port)
        self.secret = secret
        self.status = 200
        self.got = _Got()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def documents(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(b) for b in self.got.bodies]

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                signed = verify(
                    receiver.secret,
                    self.headers.get(TIMESTAMP_HEADER, ""),
                    body,
                    self.headers.get(SIGNATURE_HEADER, ""),
                )
                with receiver.lock:
                    status = receiver.status if signed else 401
                    if not signed:
                        receiver.got.bad_signatures += 1
                    elif 200 <= status < 300:
                        receiver.got.bodies.append(body)
                        receiver.got.keys[self.headers.get("Idempotency-Key", "")] += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.serve(Handler)
        return self


QUICK_RETRIES = {"backoff_initial_s": 0.3, "backoff_max_s": 1.0, "poll_s": 0.1, "max_attempts": 50}
EXAMPLE_RULE = {"algorithm": "example-threshold", "series": {"modality": ["CT"]}}


def notify_node(make_node: Any, destination: dict[str, Any], **delivery: Any) -> Any:
    """A node running the example plugin (a positive finding on any CT phantom) whose results
    go to the one notification destination ``hook``."""
    from tests.support.node import plugin_env

    return make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        destinations={"hook": destination},
        routing={"rules": [EXAMPLE_RULE], "destinations": ["hook"]},
        delivery={**QUICK_RETRIES, **delivery},
        env=plugin_env(),
    )


def send_ct(node: Any, folder: Path) -> list[Path]:
    """A small phantom chest CT C-STOREd to ``node``; its files."""
    from dicom_node.phantoms import write_ct_series
    from dicom_node.scu import send
    from tests.support.cases import PHANTOMS

    ct = write_ct_series(folder, PHANTOMS["axial"])
    assert len(send(ct, "127.0.0.1", node.port).sent) == len(ct)
    return ct


def delivery_row(node: Any) -> Any:
    rows = node.query("SELECT * FROM deliveries")
    return rows[0] if rows else None


def wait_for_delivery(node: Any, state: str, timeout_s: float, what: str) -> Any:
    """Poll the node's one delivery until it is in ``state``; its row."""
    return wait_until(
        lambda: (row := delivery_row(node)) is not None and row["state"] == state and row,
        timeout_s,
        what,
        node.log(),
    )


def delivery_attempts(trail: Path, target: str) -> list[dict[str, Any]]:
    """The audit trail's DICOM Instances Transferred messages towards ``target`` (sent 'R')."""
    from tests.support.audit import event_id, read_trail

    return [
        m
        for m in read_trail(trail)
        if event_id(m) == "DICOM Instances Transferred"
        and m["EventIdentification"]["EventActionCode"] == "R"
        and any(p.get("UserID") == target for p in m["ActiveParticipant"])
    ]


NODULE = Concept("SCT", "27925004", "Nodule")


def ct_followup_results(folder: Path) -> tuple[list[ResultObject], Path]:
    """A chest CT, its prior, and the SR the node's writers make of a follow-up: one nodule
    grown since the prior, one resolved; the result objects and a current instance."""
    import numpy as np

    from dicom_node.algorithm import Finding, FindingChange, FollowUp, LesionStatus
    from dicom_node.phantoms import write_ct_series
    from tests.support.cases import PHANTOMS

    current = write_ct_series(folder / "current", PHANTOMS["axial"])
    prior = write_ct_series(folder / "prior", PHANTOMS["axial"])
    volume = SeriesInput("c", tuple(current)).volume()
    middle = volume.affine @ np.array([*(np.array(volume.shape) / 2.0), 1.0])
    center = (float(middle[0]), float(middle[1]), float(middle[2]))
    grown = FindingChange(
        LesionStatus.INCREASED,
        0,
        volume_mm3=300.0,
        prior_center_lps_mm=center,
        prior_diameter_mm=6.0,
        prior_volume_mm3=110.0,
        volume_change_percent=172.7,
        doubling_time_days=69.1,
    )
    gone = FindingChange(
        LesionStatus.RESOLVED,
        None,
        prior_center_lps_mm=center,
        prior_diameter_mm=5.0,
        prior_volume_mm3=65.0,
    )
    result = AlgorithmResult(
        findings=[Finding("Nodule", center, (8.0, 8.0, 8.0), 0.9, finding_type=NODULE)],
        looked_for=[NODULE],
        followup=FollowUp("prior", 100.0, (grown, gone)),
    )
    inputs = {"series": SeriesInput("c", tuple(current)), "prior": SeriesInput("p", tuple(prior))}
    provenance = Provenance("lung-nodules-ct", "1.0", Weights.none())
    written = write_all(result, inputs, provenance, folder / "out", ResultsConfig())
    objects = [
        ResultObject(w.kind, w.sop_class_uid, w.sop_instance_uid, w.series_uid, w.path)
        for w in written
    ]
    return objects, current[0]
