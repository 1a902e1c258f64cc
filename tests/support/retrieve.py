"""A PACS holding a brain MR study whose FLAIR the node was not sent (issue 19 part 2): Orthanc
as Query/Retrieve SCP and DICOMweb origin, and a node whose brain rule may fetch from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.phantoms import BrainPhantomSpec, write_brain_study
from dicom_node.testing import Orthanc, free_port
from tests.support.node import NodeProcess, wait_until

ROLES = ("T1c", "T1", "T2", "FLAIR")
FRAMES = 8


@dataclass
class BrainPacs:
    """Orthanc (stopped until started) holding the whole study, and the study's files."""

    orthanc: Orthanc
    study_uid: str
    series: dict[str, str]  # role -> series UID
    files: dict[str, list[Path]]  # role -> files

    def start(self, node_port: int) -> Orthanc:
        """Start Orthanc knowing the node's AE (DICOMNODE at ``node_port``) for C-MOVE."""
        self.orthanc.modalities = {"node": ["DICOMNODE", "127.0.0.1", node_port]}
        return self.orthanc.start()


def brain_pacs(folder: Path) -> BrainPacs:
    """Orthanc loaded with the four-sequence brain study, then stopped: its storage keeps the
    study, so that a restart (after an outage) holds it from its first answer."""
    phantom = write_brain_study(
        folder / "study", BrainPhantomSpec(frames=FRAMES, rows=32, columns=32)
    )
    files = {role: sorted((folder / "study" / role).glob("MR*.dcm")) for role in ROLES}
    orthanc = Orthanc(folder / "orthanc", dicom_port=free_port(), http_port=free_port())
    orthanc.start()
    try:
        for paths in files.values():
            for path in paths:
                orthanc.upload(path)
    finally:
        orthanc.stop()
    orthanc.proc = None
    first = phantom.series[ROLES[0]][0]
    return BrainPacs(
        orthanc,
        str(first.StudyInstanceUID),
        {role: str(ds[0].SeriesInstanceUID) for role, ds in phantom.series.items()},
        files,
    )


def source(pacs: BrainPacs, method: str, **extra: Any) -> dict[str, Any]:
    """The ``retrieve.sources`` entry for Orthanc by ``method``."""
    orthanc = pacs.orthanc
    if method == "dicomweb":
        return {"method": method, "url": f"{orthanc.url}/dicom-web", **extra}
    return {
        "method": method,
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        **extra,
    }


def retrieving_node(
    make_node: Callable[..., NodeProcess],
    pacs: BrainPacs,
    method: str,
    *,
    retrieve: dict[str, Any] | None = None,
) -> NodeProcess:
    """A node that routes brain MR studies by role and, lacking a role, asks Orthanc; no
    worker (decisions only: the inference job stays queued)."""
    roles = {role: {"modality": ["MR"], "mr_weighting": [role]} for role in ROLES}
    return make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        routing={
            "rules": [{"algorithm": "brain-tumour-mr", "roles": roles, "fetch_missing": ["pacs"]}]
        },
        worker={"enabled": False},
        retrieve={
            "sources": {"pacs": source(pacs, method)},
            "backoff_initial_s": 0.5,
            "backoff_max_s": 2,
            **(retrieve or {}),
        },
    )


def decisions(node: NodeProcess, study_uid: str) -> list[dict[str, Any]]:
    """The study's routing decisions, oldest first, their JSON read."""
    rows = node.query(
        "SELECT generation, summary, routed, not_routed FROM routing_decisions"
        " WHERE level = 'study' AND subject_uid = ? ORDER BY generation",
        (study_uid,),
    )
    return [
        {
            "generation": r["generation"],
            "summary": r["summary"],
            "routed": json.loads(r["routed"]),
            "not_routed": json.loads(r["not_routed"]),
        }
        for r in rows
    ]


def wait_routed(node: NodeProcess, study_uid: str, timeout_s: float = 90.0) -> dict[str, Any]:
    """The study's first decision that routed it to brain-tumour-mr."""

    def routed() -> dict[str, Any] | None:
        return next(
            (
                d
                for d in decisions(node, study_uid)
                if any(r["algorithm"] == "brain-tumour-mr" for r in d["routed"])
            ),
            None,
        )

    found = wait_until(routed, timeout_s, "the study routed to brain-tumour-mr", node.log())
    assert isinstance(found, dict)
    return found
