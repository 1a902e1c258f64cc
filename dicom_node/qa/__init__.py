"""``dicom-node qa``: the commissioning self-test hospital IT runs against an installed node.

It acts as a modality and as the PACS at once. Phantom studies with known truth
(:mod:`dicom_node.phantoms`) for the installed algorithms the node's configuration routes are
sent to the *running* node by C-STORE (PS3.4 B.2) under qa's own calling AE title; a temporary
Storage SCP, listening where the node's ``peers`` entry for that AE title says, receives the
results the node sends back to the ``sender``. Each study's results are then checked: that
they arrived, that they belong to the study and patient sent, that the Segmentation's frames
derive from the images sent and lie on the phantom's truth, that the TID 1500 report's
measurements reference the right images, and that dciodvfy finds no error in any object.

Exit status: 0 when no check failed, 1 when one did (or the node is unreachable), 2 when the
configuration cannot be tested as it is (then the YAML to add is printed) or the command line
is wrong.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.algorithm import DEMO_WARNING
from dicom_node.config import SENDER, AeTitle, NodeConfig, RouteRule
from dicom_node.database import connect, database_path
from dicom_node.facts import SeriesFacts, describe_series
from dicom_node.jobs import JobKind, JobState, job_store_reading
from dicom_node.phantoms import (
    BrainPhantom,
    BrainPhantomSpec,
    CtPhantomSpec,
    CxrPhantomSpec,
    Nodule,
    cxr_dataset,
    write_brain_study,
    write_ct_series,
)
from dicom_node.route import Routed, decide_series, decide_study

log = logging.getLogger(__name__)

QA_AE_TITLE = "DICOMNODE_QA"
SUGGESTED_PORT = 11190  # for the peers entry qa proposes when there is none
EXIT_PASSED, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (PS3.4 B.5)
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the Structured Report storage classes
ALGORITHM_NAME = "111001"  # DCM "Algorithm Name" (PS3.16 TID 4019)

Outcome = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Check:
    """One row of the report: a check on one study (named by its algorithm) or the node."""

    study: str
    name: str
    outcome: Outcome
    detail: str


class QaUnusable(Exception):
    """The configuration or command line does not let qa test the node; the message says
    what to change."""


# -- phantoms ----------------------------------------------------------------------------------

# The phantoms below are the ones the project's own tests run the demo weights on, so what the
# checks expect of them is what those tests establish (and no more). Slices are written in
# acquisition order, so file order is the truth arrays' frame order.
CT_SPEC = CtPhantomSpec(
    slices=40,
    rows=128,
    columns=128,
    pixel_spacing_mm=(0.75, 0.75),
    noise_hu=20,
    nodules=(Nodule((-27.0, 4.0, 24.0), 9.0),),
    patient_id="DICOMNODE-QA-CT",
)
MR_SPEC = BrainPhantomSpec(seed=900_000, patient_id="DICOMNODE-QA-MR")
CXR_SPEC = CxrPhantomSpec(
    rows=400, columns=520, opacity=True, seed=500_001, patient_id="DICOMNODE-QA-CXR"
)

# Coded concepts the built-in algorithms write (see the README's "Results as DICOM").
NODULE = "27925004"
TUMOUR_CORE, WHOLE_TUMOUR, ENHANCING_TUMOUR = "108369006", "301766008", "C113842"
BRAIN_REGIONS = {
    TUMOUR_CORE: "tumour core",
    WHOLE_TUMOUR: "whole tumour",
    ENHANCING_TUMOUR: "enhancing tumour",
}
PNEUMONIA = "233604007"
PRESENT, ABSENT = codes.SCT.Present.value, codes.SCT.Absent.value

# Tolerances of the project's tests for the demo weights on these phantoms.
NODULE_OVERLAP = 0.8  # share of the nodule segment's voxels inside the phantom nodule
NODULE_CENTRE_VOXELS = 1.5  # finding centre to the nodule centre, per axis
NODULE_SIZE_RTOL = 0.35
REGION_DICE = 0.8
TUMOUR_VOLUME_RTOL = 0.2


@dataclass
class Phantom:
    """A phantom study on disk: its series by role and the truth it was made with."""

    algorithm: str
    label: str  # CT, MR, CXR
    kinds: frozenset[str]  # the result objects the algorithm writes: SEG, SR, SC
    series: dict[str, list[Path]]  # role -> files, in acquisition order
    primary: str  # the role whose grid masks are on (the SEG's source)
    ct: CtPhantomSpec | None = None
    brain: BrainPhantom | None = None
    cxr: CxrPhantomSpec | None = None
    _headers: dict[str, list[Dataset]] = field(default_factory=dict, repr=False)

    def headers(self, role: str) -> list[Dataset]:
        if role not in self._headers:
            self._headers[role] = [dcmread(p, stop_before_pixels=True) for p in self.series[role]]
        return self._headers[role]

    @property
    def paths(self) -> list[Path]:
        return [p for paths in self.series.values() for p in paths]

    def uids(self, role: str) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.headers(role)]

    def series_uids(self) -> dict[str, str]:
        return {role: str(self.headers(role)[0].SeriesInstanceUID) for role in self.series}

    @property
    def first(self) -> Dataset:
        return self.headers(self.primary)[0]


def make_ct(folder: Path) -> Phantom:
    """An axial chest CT with one solid nodule, for lung-nodules-ct."""
    paths = write_ct_series(folder / "ct", CT_SPEC)
    return Phantom(
        "lung-nodules-ct", "CT", frozenset({"SEG", "SR"}), {"series": paths}, "series", ct=CT_SPEC
    )


def make_mr(folder: Path) -> Phantom:
    """The four-sequence brain MR with a ring-enhancing tumour, for brain-tumour-mr."""
    brain = write_brain_study(folder / "mr", MR_SPEC)
    series = {role: sorted((folder / "mr" / role).glob("MR*.dcm")) for role in brain.series}
    return Phantom("brain-tumour-mr", "MR", frozenset({"SEG", "SR"}), series, "T1c", brain=brain)


def make_cxr(folder: Path) -> Phantom:
    """A PA chest radiograph with an opacity, for pneumonia-cxr."""
    path = folder / "cxr" / "CR0001.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    cxr_dataset(CXR_SPEC).save_as(path, enforce_file_format=True)
    return Phantom(
        "pneumonia-cxr", "CXR", frozenset({"SR", "SC"}), {"series": [path]}, "series", cxr=CXR_SPEC
    )


PHANTOMS: dict[str, Callable[[Path], Phantom]] = {
    "lung-nodules-ct": make_ct,
    "brain-tumour-mr": make_mr,
    "pneumonia-cxr": make_cxr,
}


# -- what the node's configuration does with the phantoms ----------------------------------------


def phantom_facts(paths: Sequence[Path], calling_aet: str) -> SeriesFacts:
    """The routing facts the node will read from a phantom series once it is stored: the
    node's own reader (:func:`dicom_node.facts.describe_series`) on the files we send."""
    return describe_series(paths, calling_aets=frozenset({calling_aet}))


@dataclass(frozen=True)
class Plan:
    """What the node's rules will do with one phantom: the routes to its algorithm, and why
    not when there are none."""

    routes: tuple[Routed, ...]
    why_not: str | None

    @property
    def destinations(self) -> set[str]:
        return {d for r in self.routes for d in r.destinations}


def plan(phantom: Phantom, config: NodeConfig, installed: frozenset[str], aet: str) -> Plan:
    """Run the node's own routing decisions on the phantom's facts (series rules, then the
    study's role rules), as the node will when the study completes."""
    facts = [phantom_facts(phantom.series[role], aet) for role in phantom.series]
    rules, defaults = config.routing.rules, config.routing.destinations
    decisions = [decide_series(f, rules, installed, 1, defaults) for f in facts]
    decisions.append(decide_study(facts[0].study_uid, facts, rules, installed, 1, defaults))
    routes = tuple(r for d in decisions for r in d.routed if r.algorithm == phantom.algorithm)
    reasons = [
        n.reason for d in decisions for n in d.not_routed if n.algorithm in (phantom.algorithm, "*")
    ]
    return Plan(routes, None if routes else "; ".join(dict.fromkeys(reasons)) or "no rule")


def select_algorithms(
    config: NodeConfig, installed: frozenset[str], requested: Sequence[str] | None
) -> tuple[list[str], list[Check]]:
    """The algorithms to test, and SKIP rows for those that cannot be; a request qa cannot
    honour is :class:`QaUnusable`."""
    ruled = {rule.algorithm for rule in config.routing.rules}
    if requested:
        unknown = [a for a in requested if a not in PHANTOMS]
        if unknown:
            raise QaUnusable(f"no phantom for {', '.join(unknown)}; qa tests {', '.join(PHANTOMS)}")
        for name in requested:
            if name not in installed:
                raise QaUnusable(f"{name} is not installed here (see dicom-node algorithms)")
            if name not in ruled:
                raise QaUnusable(f"no rule in routing.rules routes to {name}")
        return list(dict.fromkeys(requested)), []
    chosen = [a for a in PHANTOMS if a in installed and a in ruled]
    skipped = [
        Check(a, "selected", "SKIP", "not installed" if a not in installed else "no rule routes it")
        for a in PHANTOMS
        if a not in chosen
    ]
    skipped += [
        Check(a, "selected", "SKIP", "installed and routed, but qa has no phantom for it")
        for a in sorted((installed & ruled) - PHANTOMS.keys())
    ]
    if not chosen:
        raise QaUnusable(
            "none of the algorithms qa has phantoms for "
            f"({', '.join(PHANTOMS)}) is both installed and routed by the configuration"
        )
    return chosen, skipped


def _rule_label(config: NodeConfig, rule: RouteRule) -> str:
    return f"routing.rules[{config.routing.rules.index(rule)}] ({rule.algorithm})"


def config_problems(
    config: NodeConfig, plans: dict[str, Plan], aet: str, suggest_host: str
) -> tuple[list[str], str]:
    """Why the configuration cannot be tested as it is, and the YAML that fixes what can be
    fixed by adding keys (peers, sender destinations, the allow-list)."""
    problems: list[str] = []
    snippet: list[str] = []
    if config.scp.tls.enabled:
        problems.append("the node listens with TLS (scp.tls); qa speaks plain DICOM only")
    allowed = config.scp.allowed_calling_aets
    if allowed is not None and not any(p.ae_title == aet for p in allowed):
        problems.append(f"scp.allowed_calling_aets does not admit {aet}: the node would refuse qa")
        listed = ", ".join(f"{p.ae_title}@{p.host}" if p.host else p.ae_title for p in allowed)
        snippet += ["scp:", f"  allowed_calling_aets: [{listed}, {aet}]"]
    for name, p in plans.items():
        if p.why_not is not None:
            problems.append(f"{name}: the node's rules would not route its phantom ({p.why_not})")
    unsent = {n: p for n, p in plans.items() if p.routes and SENDER not in p.destinations}
    if unsent:
        problems.append(
            f"results of {', '.join(unsent)} do not go back to the calling AE: no 'sender'"
            " among their destinations"
        )
        defaults = [*config.routing.destinations, SENDER]
        if any(_uses_defaults(config, n) for n in unsent):
            snippet += ["routing:", f"  destinations: [{', '.join(defaults)}]"]
        for rule in config.routing.rules:
            if rule.algorithm in unsent and rule.destinations is not None:
                snippet.append(
                    f"# and in {_rule_label(config, rule)}:"
                    f" destinations: [{', '.join([*rule.destinations, SENDER])}]"
                )
    peer = config.peers.get(aet)
    if peer is None:
        problems.append(
            f"peers has no entry for {aet}: the node would not know where to send the results"
        )
        snippet[:0] = ["peers:", f"  {aet}: {{host: {suggest_host}, port: {SUGGESTED_PORT}}}"]
    elif peer.tls is not None:
        problems.append(f"peers.{aet} asks for TLS; qa's storage SCP listens in plain DICOM")
    return problems, "\n".join(snippet)


def _uses_defaults(config: NodeConfig, algorithm: str) -> bool:
    return any(r.algorithm == algorithm and r.destinations is None for r in config.routing.rules)


# -- addresses ---------------------------------------------------------------------------------


def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine (one we can bind to)."""
    try:
        address = ipaddress.ip_address(host)
        if address.is_loopback or address.is_unspecified:
            return True
    except ValueError:
        if host == "localhost":
            return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def node_address(config: NodeConfig, host: str | None, port: int | None) -> tuple[str, int]:
    """Where the node listens, as reachable from here: a wildcard bind is reached on loopback."""
    listen = config.scp.host
    default = "127.0.0.1" if listen in ("0.0.0.0", "::", "") else listen
    return host or default, port or config.scp.port


def address_towards(host: str) -> str:
    """Our own address as the node at ``host`` would reach it (for the suggested peers entry)."""
    if _is_local(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 104))  # no packet is sent: this only picks the outgoing interface
            return str(s.getsockname()[0])
    except OSError:
        return "<this machine's address>"


# -- the storage SCP the results come back to -----------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One object the node delivered, kept as a Part-10 file."""

    path: Path
    sop_class_uid: str
    study_uid: str
    association: int
    at: float

    @property
    def kind(self) -> str:
        if self.sop_class_uid == SEG_STORAGE:
            return "SEG"
        if self.sop_class_uid.startswith(SR_STORAGE_PREFIX):
            return "SR"
        return "SC" if self.sop_class_uid == SC_STORAGE else self.sop_class_uid


class ResultReceiver:
    """A Storage SCP (PS3.4 B.2) on pynetdicom's event handlers that keeps every instance the
    node sends as a file, and notes which associations have ended (PS3.8 7.2 A-RELEASE): one
    delivery's objects travel in one association, so a released one has brought them all."""

    def __init__(self, ae_title: str, folder: Path) -> None:
        self.ae_title = ae_title
        self.folder = folder
        self._lock = threading.Lock()
        self._received: list[Received] = []
        # Associations by a serial number of ours: id() of an ended one may be reused.
        self._serials: dict[int, int] = {}
        self._counter = itertools.count()
        self._ended: set[int] = set()
        self._server: Any = None

    def start(self, host: str, port: int) -> None:
        """Listen on (host, port); raises OSError when the port cannot be bound."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.folder.mkdir(parents=True, exist_ok=True)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]
        self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            header = dcmread(BytesIO(data), stop_before_pixels=True)
            with self._lock:
                if id(event.assoc) not in self._serials:
                    self._serials[id(event.assoc)] = next(self._counter)
                serial = self._serials[id(event.assoc)]
                path = self.folder / f"{len(self._received) + 1:04d}.dcm"
                path.write_bytes(data)
                self._received.append(
                    Received(
                        path,
                        str(header.SOPClassUID),
                        str(header.StudyInstanceUID),
                        serial,
                        time.monotonic(),
                    )
                )
        except Exception as exc:  # the node must hear a failure status, not a dropped link
            log.warning("could not keep a delivered instance: %s", exc)
            return 0xC000  # Cannot understand, PS3.4 B.2.3
        log.debug("received %s", header.SOPInstanceUID)
        return 0x0000

    def _on_ended(self, event: Any) -> None:
        with self._lock:
            serial = self._serials.pop(id(event.assoc), None)
            if serial is not None:
                self._ended.add(serial)

    def of_study(self, study_uid: str) -> list[Received]:
        with self._lock:
            return [r for r in self._received if r.study_uid == study_uid]

    def settled(self, study_uid: str) -> bool:
        """Something of the study arrived and every association that carried it has ended."""
        with self._lock:
            carried = {r.association for r in self._received if r.study_uid == study_uid}
            return bool(carried) and carried <= self._ended


# -- checks on what came back ----------------------------------------------------------------------


def made_by(ds: Dataset) -> str | None:
    """The algorithm an object names as its maker (SEG: Segment Algorithm Name, PS3.3
    C.8.20.2; SR: Algorithm Name, PS3.16 TID 4019), or None when it names none."""
    for segment in ds.get("SegmentSequence") or []:
        if "SegmentAlgorithmName" in segment:
            return str(segment.SegmentAlgorithmName)

    def walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence") or [])

    for item in walk(ds.get("ContentSequence") or []):
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and concept and concept[0].CodeValue == ALGORITHM_NAME:
            return str(item.TextValue)
    return None


def is_demo(objects: dict[str, Dataset]) -> bool:
    """Whether the results were made with demo weights: their series description then always
    begins with the DEMO warning."""
    return any(
        str(ds.get("SeriesDescription", "")).startswith(DEMO_WARNING) for ds in objects.values()
    )


def pick_results(
    phantom: Phantom, received: list[Received]
) -> tuple[dict[str, Received], list[str]]:
    """One object per kind the algorithm writes, from what arrived for the study (objects
    another algorithm routed the same study to are left aside); and what was wrong. The same
    SOP instance sent again (a retried delivery) is one object, as a PACS keeps it."""
    chosen: dict[str, Received] = {}
    instances: dict[str, str] = {}
    problems: list[str] = []
    for item in received:
        if item.kind not in phantom.kinds:
            continue
        header = dcmread(item.path, stop_before_pixels=True)
        if made_by(header) not in (None, phantom.algorithm):
            continue
        uid = str(header.SOPInstanceUID)
        if item.kind in chosen and instances[item.kind] != uid:
            problems.append(f"more than one {item.kind} arrived")
        chosen.setdefault(item.kind, item)
        instances.setdefault(item.kind, uid)
    return chosen, sorted(set(problems))


def check_identity(phantom: Phantom, objects: dict[str, Dataset]) -> Check:
    """Each result is in the sent study, for the sent patient (PS3.3 C.7.1.1, C.7.2.1), in a
    new series of its own (never added to a source series)."""
    sent = phantom.first
    source_series = set(phantom.series_uids().values())
    wrong = []
    for kind, ds in sorted(objects.items()):
        if ds.StudyInstanceUID != sent.StudyInstanceUID:
            wrong.append(f"{kind} is in another study")
        if (ds.get("PatientID"), str(ds.get("PatientName"))) != (
            sent.PatientID,
            str(sent.PatientName),
        ):
            wrong.append(f"{kind} names another patient")
        if ds.SeriesInstanceUID in source_series:
            wrong.append(f"{kind} was put in a source series")
    if wrong:
        return Check(phantom.algorithm, "study and patient", "FAIL", "; ".join(wrong))
    return Check(
        phantom.algorithm,
        "study and patient",
        "PASS",
        f"{', '.join(sorted(objects))}: the sent study and patient, new series",
    )


def check_seg_references(phantom: Phantom, seg: Dataset) -> Check:
    """The SEG shares the source's Frame of Reference (PS3.3 C.7.4.1), references the sent
    series and instances (C.8.20.1 Referenced Series), and every frame derives from one sent
    image of the source series (Derivation Image Functional Group, C.7.6.16.2.6) lying where
    the frame is placed (Plane Position, C.7.6.16.2.3); further sources (the other sequences
    of a study) must be sent images at that position too."""
    name = "SEG references"
    roles = phantom.series_uids()
    sources = set(phantom.uids(phantom.primary))
    sent_by_series = {uid: set(phantom.uids(role)) for role, uid in roles.items()}
    position = {
        str(ds.SOPInstanceUID): np.asarray(ds.ImagePositionPatient, float)
        for role in roles
        for ds in phantom.headers(role)
        if "ImagePositionPatient" in ds
    }
    wrong: list[str] = []
    if seg.get("FrameOfReferenceUID") != phantom.first.get("FrameOfReferenceUID"):
        wrong.append("another frame of reference than the images sent")
    referenced = {
        str(s.SeriesInstanceUID): {
            str(i.ReferencedSOPInstanceUID) for i in s.ReferencedInstanceSequence
        }
        for s in seg.ReferencedSeriesSequence
    }
    if roles[phantom.primary] not in referenced:
        wrong.append(f"the {phantom.primary} series sent is not referenced")
    for series, instances in referenced.items():
        if series not in sent_by_series:
            wrong.append("references a series that was not sent")
        elif not instances <= sent_by_series[series]:
            wrong.append("references instances that were not sent")
    frames = seg.get("PerFrameFunctionalGroupsSequence") or []
    unsourced = misplaced = 0
    for frame in frames:
        derived = [
            str(source.ReferencedSOPInstanceUID)
            for derivation in frame.get("DerivationImageSequence") or []
            for source in derivation.SourceImageSequence
        ]
        if len(sources.intersection(derived)) != 1 or not set(derived) <= set(position):
            unsourced += 1
            continue
        placed = frame.get("PlanePositionSequence")
        at = np.asarray(placed[0].ImagePositionPatient, float) if placed else None
        if at is not None and any(not np.allclose(position[u], at, atol=1e-3) for u in derived):
            misplaced += 1
    if unsourced:
        wrong.append(f"{unsourced} of {len(frames)} frames do not derive from one sent image")
    if misplaced:
        wrong.append(f"{misplaced} of {len(frames)} frames lie elsewhere than their source")
    if not frames:
        wrong.append("no frames")
    if wrong:
        return Check(phantom.algorithm, name, "FAIL", "; ".join(wrong))
    return Check(
        phantom.algorithm,
        name,
        "PASS",
        f"{len(frames)} frames, each from a sent {phantom.primary} image at the frame's"
        f" position; same frame of reference; {len(referenced)} sent series referenced",
    )


def _segment_code(segment: Dataset) -> str:
    return str(segment.SegmentedPropertyTypeCodeSequence[0].CodeValue)


def _by_source_instance(seg: Any, uids: list[str], number: int) -> np.ndarray:
    """Segment ``number`` as a stack in the order of ``uids``, placed through each frame's own
    reference to its source image (not through positions)."""
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[number], combine_segments=True
    )
    return np.asarray(pixels).astype(bool)


def check_seg_truth(phantom: Phantom, path: Path, demo: bool) -> Check:
    """The segmented voxels lie on the phantom's truth structure, each frame placed on the sent
    image it names (PS3.3 C.8.20: Segment Sequence and Segmented Property Type)."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    uids = phantom.uids(phantom.primary)
    try:
        if phantom.ct is not None:
            passed, detail = _nodules_on_truth(phantom.ct, seg, uids)
        elif phantom.brain is not None:
            passed, detail = _regions_on_truth(phantom.brain, seg, uids)
        else:
            return Check(phantom.algorithm, "SEG on truth", "SKIP", "no truth for a SEG")
    except (ValueError, KeyError, AttributeError) as exc:
        return Check(phantom.algorithm, "SEG on truth", "FAIL", f"cannot be placed: {exc}")
    return _truth_check(phantom, "SEG on truth", passed, detail, demo)


def _truth_check(phantom: Phantom, name: str, passed: bool, detail: str, demo: bool) -> Check:
    if not demo:  # public weights: the phantom is not what they were validated on
        return Check(phantom.algorithm, name, "SKIP", f"public weights, not asserted: {detail}")
    return Check(phantom.algorithm, name, "PASS" if passed else "FAIL", detail)


def _voxel_of(spec: CtPhantomSpec, point_lps_mm: Sequence[float]) -> tuple[int, int, int]:
    frame, row, column = (
        int(v) for v in np.rint(np.linalg.solve(spec.affine(), [*point_lps_mm, 1])[:3])
    )
    return frame, row, column


def _nodules_on_truth(spec: CtPhantomSpec, seg: Any, uids: list[str]) -> tuple[bool, str]:
    """Each phantom nodule's centre lies inside a nodule segment of which at least 80 % of the
    voxels are inside the nodule, and there are as many nodule segments as nodules."""
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence if _segment_code(s) == NODULE]
    if len(numbers) != len(spec.nodules):
        return False, f"{len(numbers)} nodule segment(s); the phantom has {len(spec.nodules)}"
    truth = spec.nodule_mask()
    notes, passed = [], True
    for nodule in spec.nodules:
        centre = _voxel_of(spec, nodule.center_lps_mm)
        hits = [n for n in numbers if _by_source_instance(seg, uids, n)[centre]]
        if not hits:
            return False, f"the nodule centre at voxel {centre} is in no nodule segment"
        mask = _by_source_instance(seg, uids, hits[0])
        overlap = float((mask & truth).sum()) / float(mask.sum())
        passed &= overlap >= NODULE_OVERLAP
        notes.append(
            f"nodule centre inside segment {hits[0]}; {overlap:.0%} of its {int(mask.sum())}"
            f" voxels on the nodule (>= {NODULE_OVERLAP:.0%})"
        )
    return passed, "; ".join(notes)


def _regions_on_truth(brain: BrainPhantom, seg: Any, uids: list[str]) -> tuple[bool, str]:
    """Each tumour region's Dice with the phantom's is at least 0.8."""
    truths = {
        TUMOUR_CORE: brain.tumour_core,
        WHOLE_TUMOUR: brain.whole_tumour,
        ENHANCING_TUMOUR: brain.enhancing_tumour,
    }
    scores: dict[str, float] = {}
    for segment in seg.SegmentSequence:
        code = _segment_code(segment)
        if code in truths:
            mask = _by_source_instance(seg, uids, int(segment.SegmentNumber))
            truth = truths[code]
            scores[code] = (
                2.0 * float((mask & truth).sum()) / max(1.0, float(mask.sum() + truth.sum()))
            )
    missing = [BRAIN_REGIONS[c] for c in truths if c not in scores]
    if missing:
        return False, f"no segment for {', '.join(missing)}"
    text = ", ".join(f"{BRAIN_REGIONS[c]} {s:.2f}" for c, s in scores.items())
    return min(scores.values()) >= REGION_DICE, f"Dice {text} (>= {REGION_DICE})"


def _evidence(sr: Dataset) -> set[str]:
    """SOP Instance UIDs in the Current Requested Procedure Evidence (PS3.3 C.17.2.2)."""
    return {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence") or []
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _region_image(group: Any) -> str:
    return str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def check_sr_references(phantom: Phantom, path: Path, seg: Dataset | None) -> Check:
    """The TID 1500 report's evidence lists the sent images (and the SEG), each image region
    (TID 1410) is on a sent image of the source series, each volumetric group (TID 1411) is on
    a segment of the SEG that arrived, and a classification (TID 1501) names the sent image."""
    import highdicom as hd

    name = "SR references"
    sr = hd.sr.srread(path)
    sources = set(phantom.uids(phantom.primary))
    wrong: list[str] = []
    evidence = _evidence(sr)
    if not sources <= evidence:
        wrong.append(f"{len(sources - evidence)} sent image(s) missing from its evidence")
    if seg is not None and str(seg.SOPInstanceUID) not in evidence:
        wrong.append("the SEG is missing from its evidence")
    content = sr.content
    planar = content.get_planar_roi_measurement_groups()
    volumetric = content.get_volumetric_roi_measurement_groups()
    images = content.get_image_measurement_groups()
    off_images = [g for g in planar if _region_image(g) not in sources]
    if off_images:
        wrong.append(f"{len(off_images)} region(s) on images that were not sent")
    segments = {int(s.SegmentNumber) for s in (seg.SegmentSequence if seg is not None else [])}
    for group in volumetric:
        reference = group.referenced_segment
        if seg is None or reference.referenced_sop_instance_uid != seg.SOPInstanceUID:
            wrong.append("a volume refers to another segmentation than the SEG that arrived")
        elif not set(reference.referenced_segment_numbers) <= segments:
            wrong.append("a volume refers to a segment the SEG does not have")
    classified = [g for g in images if g.source_images]
    for group in classified:
        if {str(i.referenced_sop_instance_uid) for i in group.source_images} - sources:
            wrong.append("a classification names an image that was not sent")
    if wrong:
        return Check(phantom.algorithm, name, "FAIL", "; ".join(sorted(set(wrong))))
    return Check(
        phantom.algorithm,
        name,
        "PASS",
        f"evidence: {len(sources)} sent image(s){' and the SEG' if seg is not None else ''};"
        f" {len(planar)} region(s) on sent images, {len(volumetric)} volume(s) on SEG"
        f" segments, {len(classified)} classification(s) of the sent image",
    )


def check_sr_truth(phantom: Phantom, path: Path, demo: bool) -> Check:
    """The report's measurements agree with the phantom (what the project's tests assert of
    the demo weights): the nodule's circle is centred on it and its diameter near the
    nodule's; the whole tumour's volume; the opacity classified Present."""
    import highdicom as hd

    content = hd.sr.srread(path).content
    try:
        if phantom.ct is not None:
            passed, detail = _nodule_in_report(phantom, content)
        elif phantom.brain is not None:
            passed, detail = _tumour_volume_in_report(phantom.brain, content)
        else:
            assert phantom.cxr is not None
            passed, detail = _pneumonia_in_report(phantom.cxr, content)
    except (ValueError, KeyError, AttributeError, IndexError) as exc:
        return Check(phantom.algorithm, "SR on truth", "FAIL", f"unreadable: {exc}")
    return _truth_check(phantom, "SR on truth", passed, detail, demo)


def _region_offset_voxels(
    group: Any, image: Dataset, point_lps_mm: Sequence[float]
) -> tuple[float, float]:
    """How far a region's centre is from a point: in-plane in pixels (the larger of the two
    directions) and through the plane in slice thicknesses. Graphic data are (column, row)
    with a pixel centre at (c + 0.5, r + 0.5) (PS3.3 C.18.6.1.1); the closing vertex is
    dropped."""
    column, row = (np.asarray(group.roi.value, dtype=float)[:-1] - 0.5).mean(axis=0)
    position = np.asarray(image.ImagePositionPatient, float)
    along_row, along_column = np.split(np.asarray(image.ImageOrientationPatient, float), 2)
    row_mm, column_mm = (float(v) for v in image.PixelSpacing)
    centre = position + column * column_mm * along_row + row * row_mm * along_column
    offset = centre - np.asarray(point_lps_mm, float)
    in_plane = max(
        abs(float(offset @ along_row)) / column_mm, abs(float(offset @ along_column)) / row_mm
    )
    through = abs(float(offset @ np.cross(along_row, along_column)))
    return in_plane, through / float(image.SliceThickness)


def _nodule_in_report(phantom: Phantom, content: Any) -> tuple[bool, str]:
    spec = phantom.ct
    assert spec is not None
    groups = [
        g for g in content.get_planar_roi_measurement_groups() if g.finding_type.value == NODULE
    ]
    if len(groups) != len(spec.nodules):
        return False, f"{len(groups)} nodule(s) reported; the phantom has {len(spec.nodules)}"
    images = dict(zip(phantom.uids(phantom.primary), phantom.headers(phantom.primary), strict=True))
    passed, notes = True, []
    for nodule in spec.nodules:
        placed = [
            (_region_offset_voxels(g, images[_region_image(g)], nodule.center_lps_mm), g)
            for g in groups
        ]
        (in_plane, through), group = min(placed, key=lambda p: max(p[0]))
        # The circle is drawn on the source slice nearest the finding's centre: up to half a
        # slice further from the nodule than the finding itself.
        close = in_plane <= NODULE_CENTRE_VOXELS and through <= NODULE_CENTRE_VOXELS + 0.5
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        size_ok = abs(float(diameter.value) - nodule.diameter_mm) <= (
            NODULE_SIZE_RTOL * nodule.diameter_mm
        )
        passed &= close and size_ok
        notes.append(
            f"circle centre {in_plane:.1f} pixel(s) in plane and {through:.1f} slice(s)"
            f" from the nodule centre; diameter {float(diameter.value):.1f} mm"
            f" (phantom {nodule.diameter_mm:.1f} mm)"
        )
    return passed, "; ".join(notes)


def _tumour_volume_in_report(brain: BrainPhantom, content: Any) -> tuple[bool, str]:
    groups = [
        g
        for g in content.get_volumetric_roi_measurement_groups()
        if g.finding_type.value == WHOLE_TUMOUR
    ]
    if len(groups) != 1:
        return False, f"{len(groups)} whole-tumour volume(s) reported, expected one"
    (volume,) = groups[0].get_measurements(name=codes.SCT.Volume)
    voxel_ml = float(abs(np.linalg.det(brain.affine[:3, :3]))) / 1000.0
    truth_ml = float(brain.whole_tumour.sum()) * voxel_ml
    value = float(volume.value) / (1000.0 if volume.unit.value == "mm3" else 1.0)
    ok = abs(value - truth_ml) <= TUMOUR_VOLUME_RTOL * truth_ml
    return ok, f"whole tumour {value:.1f} mL, phantom {truth_ml:.1f} mL (within 20 %)"


def _pneumonia_in_report(spec: CxrPhantomSpec, content: Any) -> tuple[bool, str]:
    """The pneumonia classification (TID 1501) says Present for a phantom with an opacity,
    Absent for a clean one."""
    expected = PRESENT if spec.opacity else ABSENT
    for group in content.get_image_measurement_groups():
        if group.finding_type.value != PNEUMONIA:
            continue
        (evaluation,) = group.get_qualitative_evaluations()
        (probability,) = group.get_measurements()
        said = evaluation.value.value
        words = {PRESENT: "Present", ABSENT: "Absent"}
        return said == expected, (
            f"pneumonia {words.get(said, said)} (probability {float(probability.value):.2f})"
            f" on a phantom {'with an opacity' if spec.opacity else 'without opacity'}"
        )
    return False, "no pneumonia classification in the report"


def check_sc(phantom: Phantom, sc: Dataset) -> Check:
    """The heat-map capture (PS3.3 A.8) is on the radiograph's pixel grid."""
    sent = phantom.first
    grid = (int(sc.Rows), int(sc.Columns))
    if grid != (int(sent.Rows), int(sent.Columns)):
        return Check(
            phantom.algorithm,
            "SC grid",
            "FAIL",
            f"{grid[0]} x {grid[1]}, the radiograph is {sent.Rows} x {sent.Columns}",
        )
    return Check(
        phantom.algorithm,
        "SC grid",
        "PASS",
        f"{grid[0]} x {grid[1]} {sc.PhotometricInterpretation}, the radiograph's grid",
    )


def dciodvfy_tool() -> str | None:
    """dicom3tools' dciodvfy; Debian's first, as the project's tests find it."""
    debian = Path("/usr/bin/dciodvfy")
    return str(debian) if debian.exists() else shutil.which("dciodvfy")


def check_dciodvfy(algorithm: str, kind: str, path: Path) -> Check:
    """dciodvfy checks the object against its IOD (PS3.3) and the encoding rules (PS3.5):
    no error passes; warnings are counted."""
    name = f"dciodvfy {kind}"
    tool = dciodvfy_tool()
    if tool is None:
        return Check(algorithm, name, "SKIP", "(dciodvfy not installed)")
    try:
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return Check(algorithm, name, "FAIL", "dciodvfy did not finish in 120 s")
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    detail = f"{len(errors)} error(s), {len(warnings)} warning(s)"
    if errors:
        return Check(algorithm, name, "FAIL", f"{detail}; first: {errors[0]}")
    return Check(algorithm, name, "PASS", detail)


def node_side(config: NodeConfig, phantom: Phantom) -> str | None:
    """What the node's own records say became of a study, when its database is on this
    machine (read-only; None otherwise): why nothing came back is the first question."""
    path = database_path(config.store.data_dir.resolve())
    if not path.exists():
        return None
    study = str(phantom.first.StudyInstanceUID)
    subjects = [study, *phantom.series_uids().values()]
    try:
        conn = connect(path, readonly=True)
        try:
            stored = conn.execute(
                "SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study,)
            ).fetchone()[0]
            store = job_store_reading(conn)
            jobs = [
                j
                for j in store.recent(JobKind.INFERENCE, subject_uids=subjects)
                if j.inference.algorithm == phantom.algorithm
            ]
            deliveries = store.deliveries_of([j.id for j in jobs[:1]])
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if not stored:
        return "the node's records hold nothing of the study"
    if not jobs:
        return f"the node stored {stored} instance(s) but made no {phantom.algorithm} job"
    job = jobs[0]  # the newest
    error = f": {job.error}" if job.error else ""
    if job.state is not JobState.SUCCEEDED:
        why = {
            JobState.QUEUED: "not started (is a worker running?)",
            JobState.RUNNING: "still running",
        }
        return f"node job {job.id} {why.get(job.state, 'failed')}{error}"
    sender = [d for d in deliveries.get(job.id, []) if d.destination == SENDER]
    if not sender:
        return f"node job {job.id} succeeded, but nothing was to be sent to the sender"
    delivery = sender[0]
    return (
        f"node job {job.id} succeeded; its delivery to sender ({delivery.peer_aet}) is"
        f" {delivery.state.value} after {delivery.attempts} attempt(s)"
        + (f": {delivery.last_error}" if delivery.last_error else "")
    )


def evaluate(
    phantom: Phantom,
    received: list[Received],
    sent_at: float,
    timeout_s: float,
    config: NodeConfig,
) -> list[Check]:
    """Every check of one study's results."""
    algorithm = phantom.algorithm
    chosen, problems = pick_results(phantom, received)
    objects = {kind: dcmread(item.path) for kind, item in chosen.items()}
    demo = is_demo(objects)
    missing = sorted(phantom.kinds - chosen.keys())
    if not chosen:
        return [
            Check(
                algorithm,
                "results arrived",
                "FAIL",
                f"nothing within {timeout_s:.0f} s; "
                + (node_side(config, phantom) or "see 'dicom-node jobs' on the node"),
            )
        ]
    waited = max(item.at for item in chosen.values()) - sent_at
    arrived = f"{', '.join(sorted(chosen))} {waited:.1f} s after sending"
    # With public weights a phantom nodule may go unseen; the report then says so and no
    # SEG is written, which is not the node's fault.
    seg_optional = missing == ["SEG"] and not demo
    if problems or (missing and not seg_optional):
        why = [*problems, *([f"no {', '.join(missing)}"] if missing else [])]
        checks = [Check(algorithm, "results arrived", "FAIL", f"{arrived}; {'; '.join(why)}")]
    else:
        note = "; no SEG (public weights found nothing)" if seg_optional else ""
        checks = [Check(algorithm, "results arrived", "PASS", arrived + note)]
    checks.append(check_identity(phantom, objects))
    seg = objects.get("SEG")
    if "SEG" in phantom.kinds:
        if seg is None:
            checks += [
                Check(algorithm, n, "SKIP" if seg_optional else "FAIL", "no SEG arrived")
                for n in ("SEG references", "SEG on truth")
            ]
        else:
            checks.append(check_seg_references(phantom, seg))
            checks.append(check_seg_truth(phantom, chosen["SEG"].path, demo))
    if "SR" in chosen:
        checks.append(check_sr_references(phantom, chosen["SR"].path, seg))
        checks.append(check_sr_truth(phantom, chosen["SR"].path, demo))
    else:
        checks += [
            Check(algorithm, n, "FAIL", "no SR arrived") for n in ("SR references", "SR on truth")
        ]
    if "SC" in phantom.kinds:
        sc = objects.get("SC")
        checks.append(
            check_sc(phantom, sc)
            if sc is not None
            else Check(algorithm, "SC grid", "FAIL", "no SC arrived")
        )
    checks += [check_dciodvfy(algorithm, kind, item.path) for kind, item in sorted(chosen.items())]
    return checks


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QaOptions:
    host: str | None = None
    port: int | None = None
    called_aet: str | None = None
    calling_aet: str = QA_AE_TITLE
    algorithms: tuple[str, ...] | None = None
    timeout_s: float = 300.0
    as_json: bool = False
    keep: Path | None = None
    config_name: str = "the configuration"


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="dicom-node-qa-") as folder:
        yield Path(folder)


def _listen(receiver: ResultReceiver, host: str, port: int) -> str:
    """Start the receiver on the peers entry's address, or on every interface when that
    address is not one of ours (a name the node resolves differently, a NAT address)."""
    bind = host if _is_local(host) else "0.0.0.0"
    receiver.start(bind, port)
    return bind


def run_qa(config: NodeConfig, options: QaOptions) -> int:
    """The whole self-test; prints the report and returns the exit status."""
    from dicom_node.route import installed_algorithms

    aet = options.calling_aet.strip()
    host, port = node_address(config, options.host, options.port)
    called = options.called_aet or config.scp.ae_title
    try:
        for title in (aet, called):
            try:
                TypeAdapter(AeTitle).validate_python(title)
            except ValidationError:
                raise QaUnusable(f"{title!r} is not a valid AE title (PS3.5 6.2)") from None
        installed = installed_algorithms()
        chosen, skipped = select_algorithms(config, installed, options.algorithms)
    except QaUnusable as exc:
        print(f"dicom-node qa: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    with _workdir(options.keep) as work:
        phantoms = [PHANTOMS[name](work / "sent") for name in chosen]
        plans = {p.algorithm: plan(p, config, installed, aet) for p in phantoms}
        problems, snippet = config_problems(config, plans, aet, address_towards(host))
        if problems:
            _print_unusable(options.config_name, problems, snippet)
            return EXIT_UNUSABLE
        peer = config.peers[aet]
        receiver = ResultReceiver(aet, work / "received")
        try:
            bound = _listen(receiver, peer.host, peer.port)
        except OSError as exc:
            print(
                f"dicom-node qa: cannot listen on {peer.host}:{peer.port} (peers.{aet}):"
                f" {exc.strerror or exc}",
                file=sys.stderr,
            )
            return EXIT_UNUSABLE
        try:
            checks = _exercise(config, options, phantoms, plans, receiver, (host, port, called))
        finally:
            receiver.stop()
    checks = [*skipped, *checks]
    header = f"{called} at {host}:{port}, sending as {aet}, results received on {bound}:{peer.port}"
    _report(checks, header, options.as_json)
    return EXIT_FAILED if any(c.outcome == "FAIL" for c in checks) else EXIT_PASSED


def _exercise(
    config: NodeConfig,
    options: QaOptions,
    phantoms: list[Phantom],
    plans: dict[str, Plan],
    receiver: ResultReceiver,
    node: tuple[str, int, str],
) -> list[Check]:
    """C-ECHO, then send every phantom, wait for the results, and check them."""
    from dicom_node.scu import AssociationFailed, echo, send

    host, port, called = node
    aet = options.calling_aet.strip()
    try:
        status = echo(host, port, calling_aet=aet, called_aet=called, timeout_s=30)
        echoed = Check(
            "node",
            "C-ECHO",
            "PASS" if status == 0 else "FAIL",
            f"{called} at {host}:{port} answered 0x{status:04X}",
        )
    except (AssociationFailed, OSError) as exc:
        echoed = Check("node", "C-ECHO", "FAIL", f"{called} at {host}:{port}: {exc}")
    if echoed.outcome == "FAIL":
        return [echoed]
    checks = [echoed]
    sent_at: dict[str, float] = {}
    for phantom in phantoms:
        others = sorted(plans[phantom.algorithm].destinations - {SENDER})
        also = f", also to {', '.join(others)}" if others else ""
        checks.append(
            Check(
                phantom.algorithm,
                "routing (config)",
                "PASS",
                f"{phantom.label} phantom routed; results to sender{also}",
            )
        )
        try:
            report = send(phantom.paths, host, port, calling_aet=aet, called_aet=called)
            ok, detail = report.ok, f"{len(report.sent)} of {len(phantom.paths)} instances stored"
            if report.failed:
                detail += f"; first failure: {report.failed[0][1]}"
        except (AssociationFailed, OSError) as exc:
            ok, detail = False, str(exc)
        checks.append(Check(phantom.algorithm, "C-STORE", "PASS" if ok else "FAIL", detail))
        if ok:
            sent_at[phantom.algorithm] = time.monotonic()
    waiting = [p for p in phantoms if p.algorithm in sent_at]
    study = {p.algorithm: str(p.first.StudyInstanceUID) for p in waiting}
    deadline = time.monotonic() + options.timeout_s

    def done(p: Phantom) -> bool:
        kinds = {r.kind for r in receiver.of_study(study[p.algorithm])}
        return p.kinds <= kinds or ("SR" in kinds and receiver.settled(study[p.algorithm]))

    while time.monotonic() < deadline and not all(done(p) for p in waiting):
        time.sleep(0.2)
    for phantom in waiting:
        checks += evaluate(
            phantom,
            receiver.of_study(study[phantom.algorithm]),
            sent_at[phantom.algorithm],
            options.timeout_s,
            config,
        )
    return checks


def _print_unusable(config_name: str, problems: list[str], snippet: str) -> None:
    lines = [f"dicom-node qa: {config_name} does not let qa test the node:"]
    lines += [f"  - {p}" for p in problems]
    if snippet:
        lines += [
            f"Add this to {config_name} (merging with the sections already there), restart the"
            " node, and run qa again:",
            "",
            snippet,
        ]
    print("\n".join(lines), file=sys.stderr)


def _report(checks: list[Check], header: str, as_json: bool) -> None:
    failed = sum(c.outcome == "FAIL" for c in checks)
    verdict = "FAIL" if failed else "PASS"
    counts = {o: sum(c.outcome == o for c in checks) for o in ("PASS", "FAIL", "SKIP")}
    if as_json:
        print(
            json.dumps(
                {
                    "verdict": verdict,
                    "node": header,
                    "counts": counts,
                    "checks": [asdict(c) for c in checks],
                },
                indent=2,
            )
        )
        return
    widths = [max(len(getattr(c, f)) for c in checks) for f in ("study", "name")]
    print(f"dicom-node qa: {header}")
    print(f"{'study':<{widths[0]}}  {'check':<{widths[1]}}  result  detail")
    for c in checks:
        print(f"{c.study:<{widths[0]}}  {c.name:<{widths[1]}}  {c.outcome:<6}  {c.detail}")
    print(
        f"verdict: {verdict} ({counts['PASS']} passed, {counts['FAIL']} failed,"
        f" {counts['SKIP']} skipped)"
    )
