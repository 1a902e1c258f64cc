"""Routing: which algorithms see a completed series or study — and, when none, why not.

Every completion job (series or study) gets exactly one recorded decision: the algorithms it
was routed to, with their inputs, and for every rule that did not route it the reason. Routed
inputs become ``inference`` jobs in the same transaction that records the decision and closes
the completion job, so a crash never leaves a decision without its jobs or runs one twice.

A hard guard comes before any rule: only image objects a model can take are routable. SEG, SR,
KOS, presentation states, RT objects, raw data and private non-image objects (a Siemens
PhoenixZIPReport) are never routed, whatever a rule says.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.algorithm import SERIES_INPUT, PriorSpec
from dicom_node.config import RouteRule, RoutingConfig, SeriesMatch
from dicom_node.database import Connection, Database
from dicom_node.errors import ConfigError
from dicom_node.events import Events, JobsRouted, RoutedJob, study_refs
from dicom_node.facts import SeriesFacts, read_series_facts, series_paths, study_series
from dicom_node.jobs import (
    RETRIEVED_MARK,
    InferencePayload,
    Job,
    JobKind,
    JobState,
    JobStore,
    RetrievalPayload,
    job_store,
    retrieved_host,
)
from dicom_node.loops import Loop
from dicom_node.mr_sequence import WEIGHTINGS, classify, describes, never_a_role
from dicom_node.plugins import discover
from dicom_node.priority import DEFAULT_PRIORITY, Priority
from dicom_node.priors import FOUND, PriorFound, find_prior, study_identity, study_of_series
from dicom_node.store import store_key

log = logging.getLogger(__name__)

# Image storage SOP classes (PS3.4 B.5) whose pixel data a model may be given.
ROUTABLE_SOP_CLASSES = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        CTImageStorage,
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        MRImageStorage,
        EnhancedMRImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
        # Radiographs are often archived as Secondary Capture (the RSNA pneumonia set is).
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    }
)
# Modalities of derived and non-image objects, whatever SOP class carries them.
NEVER_ROUTED_MODALITIES = frozenset(
    {"SEG", "SR", "KO", "PR", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC"}
)
_NEVER_ROUTED_DESCRIPTION = re.compile(r"(?i)phoenixzipreport|dose report|patient protocol")


def installed_algorithms() -> frozenset[str]:
    """Names of the algorithms whose entry points load (broken plugins are not routed to)."""
    return frozenset(name for name, reg in discover().items() if reg.algorithm is not None)


@dataclass(frozen=True)
class Candidate:
    """One series of a study as a role rule saw it: the role it got, or why it got none."""

    series_uid: str
    series_number: int | None
    description: str
    role: str | None
    reason: str


@dataclass(frozen=True)
class Retrieval:
    """One retrieval job of a study for a rule (``fetch_missing``) as a decision saw it: what
    it asked which source for, how far it got, and what came (the series and instances the
    index marks as fetched by it)."""

    job_id: int
    source: str
    algorithm: str  # of the rule that asked
    roles: tuple[str, ...]  # asked for
    state: str  # the job's: queued, running, succeeded, failed, cancelled
    came_series: tuple[str, ...] = ()  # series UIDs
    came_instances: int = 0
    error: str | None = None  # of its last failed attempt

    @property
    def open(self) -> bool:
        return self.state in (JobState.QUEUED.value, JobState.RUNNING.value)

    def describe(self) -> str:
        came = (
            f"{len(self.came_series)} series ({self.came_instances} instances) came"
            if self.came_series
            else "nothing came"
        )
        return f"job {self.job_id} from {self.source} {self.state}: {came}" + (
            f" ({self.error})" if self.error and self.state != JobState.SUCCEEDED.value else ""
        )


@dataclass(frozen=True)
class Asked:
    """What a rule with ``fetch_missing`` asked for, of whom, and what each retrieval did."""

    roles: tuple[str, ...]
    sources: tuple[str, ...]
    retrievals: tuple[Retrieval, ...] = ()


@dataclass(frozen=True)
class Routed:
    algorithm: str
    inputs: dict[str, str]  # input name (a role, or "series") -> series UID
    destinations: tuple[str, ...] = ()  # where the results go (names, or "sender")
    senders: tuple[str, ...] = ()  # calling AEs the inputs came from, for "sender"
    candidates: tuple[Candidate, ...] = ()  # role rules: every series of the study, and why
    priority: Priority = DEFAULT_PRIORITY  # the rule's: its job's class in the queue
    asked: Asked | None = None  # fetch_missing: what was asked for the study, and what came
    prior: str = ""  # an algorithm that wants a prior: the one found, or why none


@dataclass(frozen=True)
class NotRouted:
    algorithm: str  # "*" when the guard excluded the series from every algorithm
    reason: str
    candidates: tuple[Candidate, ...] = ()  # role rules: every series of the study, and why
    asked: Asked | None = None  # fetch_missing: what was asked for, and what came so far


@dataclass(frozen=True)
class RetrievalRequest:
    """A retrieval a decision queues (one job per source, asked in the rule's order)."""

    algorithm: str
    roles: tuple[str, ...]
    modalities: tuple[str, ...]  # of the series to fetch; empty: any
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    level: str  # "series" or "study"
    subject_uid: str
    generation: int
    routed: list[Routed] = field(default_factory=list)
    not_routed: list[NotRouted] = field(default_factory=list)
    retrievals: list[RetrievalRequest] = field(default_factory=list)  # to queue with it

    def summary(self) -> str:
        """One line for a person: what it was routed to, or why not (series by number only:
        the line is logged)."""
        parts = [
            f"routed to {r.algorithm}{_roles_by_number(r)}"
            + (f" ({r.prior})" if r.prior.startswith(FOUND) else "")
            + ("" if r.priority == DEFAULT_PRIORITY else f" as {r.priority}")
            for r in self.routed
        ]
        parts += [f"{n.algorithm}: {n.reason}" for n in self.not_routed]
        return "; ".join(parts) or "no routing rule applies"


def _roles_by_number(routed: Routed) -> str:
    numbers = {c.series_uid: c.series_number for c in routed.candidates}
    if not numbers:
        return ""
    return (
        " ("
        + ", ".join(
            f"{role}: series {numbers.get(uid) if numbers.get(uid) is not None else '?'}"
            for role, uid in routed.inputs.items()
        )
        + ")"
    )


def _listed(value: str, allowed: Iterable[str]) -> bool:
    return value.upper() in {a.upper() for a in allowed}


def mismatch(match: SeriesMatch, facts: SeriesFacts) -> str | None:
    """Why ``facts`` fails ``match`` (the first failing condition), or None when it matches."""
    checks: list[tuple[bool, Callable[[], str]]] = [
        (
            match.modality is not None and not _listed(facts.modality, match.modality),
            lambda: (
                f"modality {facts.modality or '(none)'} is not {'/'.join(match.modality or ())}"
            ),
        ),
        (
            match.sop_class is not None and not facts.sop_class_uids <= set(match.sop_class),
            lambda: "SOP class is not one of the rule's",
        ),
        (
            match.body_part is not None and not _listed(facts.body_part, match.body_part),
            lambda: f"body part {facts.body_part or '(none)'} is not one of the rule's",
        ),
        (
            match.description is not None and not re.search(match.description, facts.description),
            lambda: "series description does not match the rule",
        ),
        (
            match.exclude_description is not None
            and re.search(match.exclude_description, facts.description) is not None,
            lambda: "series description is excluded by the rule",
        ),
        (
            match.protocol is not None and not re.search(match.protocol, facts.protocol),
            lambda: "protocol name does not match the rule",
        ),
        (
            match.image_type is not None
            and not {v.upper() for v in match.image_type} <= set(facts.image_type),
            lambda: f"image type {'/'.join(facts.image_type) or '(none)'} lacks a required value",
        ),
        (
            match.exclude_image_type is not None
            and bool({v.upper() for v in match.exclude_image_type} & set(facts.image_type)),
            lambda: f"image type {'/'.join(facts.image_type)} is excluded by the rule",
        ),
        (
            match.orientation is not None and facts.orientation not in match.orientation,
            lambda: (
                f"orientation {facts.orientation or '(none)'} is not"
                f" {'/'.join(match.orientation or ())}"
            ),
        ),
        (
            match.min_slices is not None and facts.slices < match.min_slices,
            lambda: f"{facts.slices} slices, fewer than {match.min_slices}",
        ),
        (
            match.max_slices is not None and facts.slices > match.max_slices,
            lambda: f"{facts.slices} slices, more than {match.max_slices}",
        ),
        (
            match.min_pixel_spacing_mm is not None
            and (facts.pixel_spacing_mm or 0) < match.min_pixel_spacing_mm,
            lambda: f"pixel spacing {facts.pixel_spacing_mm} mm below the rule's minimum",
        ),
        (
            match.max_pixel_spacing_mm is not None
            and (
                facts.pixel_spacing_mm is None
                or facts.pixel_spacing_mm > match.max_pixel_spacing_mm
            ),
            lambda: f"pixel spacing {facts.pixel_spacing_mm} mm above the rule's maximum",
        ),
        (
            match.calling_aet is not None
            and not facts.calling_aets <= {a.upper() for a in match.calling_aet},
            lambda: f"sent by {'/'.join(sorted(facts.calling_aets))}, not an allowed calling AE",
        ),
        (
            match.station_name is not None and not _listed(facts.station_name, match.station_name),
            lambda: f"station {facts.station_name or '(none)'} is not one of the rule's",
        ),
        (
            match.request_priority is not None
            and facts.request_priority not in match.request_priority,
            lambda: (
                f"sent with Priority {facts.request_priority or '(not recorded)'}, not"
                f" {'/'.join(match.request_priority or ())}"
            ),
        ),
        (
            match.mr_weighting is not None and classify(facts).weighting not in match.mr_weighting,
            lambda: _weighting_mismatch(match, facts),
        ),
    ]
    return next((explain() for failed, explain in checks if failed), None)


def _weighting_mismatch(match: SeriesMatch, facts: SeriesFacts) -> str:
    found = classify(facts)
    if found.weighting is None:
        return f"passed over: {found.reason}"
    return f"{found.weighting} ({found.reason}), not {'/'.join(match.mr_weighting or ())}"


def never_routed(facts: SeriesFacts) -> str | None:
    """Why no algorithm may ever see this series, or None when it is an image a model can take."""
    others = sorted(facts.sop_class_uids - ROUTABLE_SOP_CLASSES)
    if others:
        return f"not an image a model takes (SOP class {', '.join(others)})"
    if facts.unreadable:
        # Before the checks below: they read the headers, and these could not be read.
        return f"{facts.unreadable} stored instance(s) have unreadable headers"
    if facts.modality in NEVER_ROUTED_MODALITIES:
        return f"modality {facts.modality} is a derived or non-image object"
    if _NEVER_ROUTED_DESCRIPTION.search(facts.description):
        return "a scanner report stored as an image, not a patient image"
    if not facts.has_pixels:
        return "no pixel data"
    return None


def _series_rule(
    rule: RouteRule, facts: SeriesFacts, installed: frozenset[str], defaults: Sequence[str]
) -> Routed | NotRouted:
    assert rule.series is not None
    why = mismatch(rule.series, facts)
    if why is not None:
        return NotRouted(rule.algorithm, why)
    if rule.algorithm not in installed:
        return NotRouted(rule.algorithm, "matches, but the algorithm is not installed")
    return Routed(
        rule.algorithm,
        {SERIES_INPUT: facts.series_uid},
        _destinations(rule, defaults),
        tuple(sorted(facts.calling_aets)),
        priority=rule.priority,
    )


def _destinations(rule: RouteRule, defaults: Sequence[str]) -> tuple[str, ...]:
    return tuple(defaults if rule.destinations is None else rule.destinations)


def decide_series(
    facts: SeriesFacts,
    rules: list[RouteRule],
    installed: frozenset[str],
    generation: int,
    default_destinations: Sequence[str] = (),
) -> Decision:
    """The decision for a completed series: series rules now, role rules at study completion."""
    decision = Decision("series", facts.series_uid, generation)
    guard = never_routed(facts)
    if guard is not None:
        decision.not_routed.append(NotRouted("*", guard))
        return decision
    for rule in rules:
        if rule.series is not None:
            outcome = _series_rule(rule, facts, installed, default_destinations)
            if isinstance(outcome, Routed):
                decision.routed.append(outcome)
            else:
                decision.not_routed.append(outcome)
        else:
            assert rule.roles is not None
            fits = [role for role, match in rule.roles.items() if mismatch(match, facts) is None]
            decision.not_routed.append(
                NotRouted(
                    rule.algorithm,
                    f"takes a study with {', '.join(rule.roles)}; this series "
                    + (
                        f"can be {'/'.join(fits)}"
                        if fits
                        else f"fits no role ({_no_role(rule.roles, facts)})"
                    )
                    + " (decided when the study completes)",
                )
            )
    return decision


def _no_role(roles: dict[str, SeriesMatch], facts: SeriesFacts) -> str:
    """Why a series fits no role: the first role's reason (for MR, its weighting or why it
    was passed over)."""
    return mismatch(next(iter(roles.values())), facts) or "it matches no role"


@dataclass(frozen=True)
class RoleMatch:
    """Roles given to series: role -> series UID, the roles no series fits, and for every
    candidate series the role it got or why it got none."""

    assigned: dict[str, str]
    missing: list[str]
    candidates: tuple[Candidate, ...]


def assign_roles(roles: dict[str, SeriesMatch], candidates: list[SeriesFacts]) -> RoleMatch:
    """Give each role one series, no series two roles, and record why for every series.

    A mask or derived MR series never takes a role, whatever a rule says. Among the series
    that fit a role, one fitting fewer roles comes first (a post-contrast T1 also looks like a
    T1 to a loose description pattern); then one weighted from its acquisition attributes over
    one weighted from its description only; then one whose description names the role; then
    the latest series number.
    """
    by_uid = {f.series_uid: f for f in candidates}
    unusable = {f.series_uid: why for f in candidates if (why := never_a_role(f)) is not None}
    fits = {
        f.series_uid: {role for role, match in roles.items() if mismatch(match, f) is None}
        for f in candidates
        if f.series_uid not in unusable
    }

    def rank(role: str, uid: str) -> tuple[int, bool, bool, int]:
        facts = by_uid[uid]
        return (
            len(fits[uid]),
            classify(facts).basis != "acquisition",
            not (role in WEIGHTINGS and describes(role, facts)),
            -(facts.series_number or 0),
        )

    assigned: dict[str, str] = {}
    missing: list[str] = []
    for role in roles:
        options = [uid for uid, ok in fits.items() if role in ok and uid not in assigned.values()]
        if not options:
            missing.append(role)
            continue
        assigned[role] = min(options, key=partial(rank, role))
    role_of = {uid: role for role, uid in assigned.items()}

    def reason(facts: SeriesFacts) -> str:
        uid = facts.series_uid
        if uid in unusable:
            return f"never a role: {unusable[uid]}"
        if uid in role_of:
            found = classify(facts)
            return found.reason if found.weighting == role_of[uid] else "matches the rule"
        if not fits[uid]:
            why = _no_role(roles, facts)
            return why if why.startswith("passed over") else f"fits no role: {why}"
        role = sorted(fits[uid])[0]
        chosen = by_uid[assigned[role]]
        mine, theirs = rank(role, uid), rank(role, chosen.series_uid)
        why = next(
            text
            for differs, text in (
                (mine[0] != theirs[0], "it fits fewer roles"),
                (mine[1] != theirs[1], "it was weighted from its acquisition attributes"),
                (mine[2] != theirs[2], f"its description names {role}"),
                (True, "it is the later series"),
            )
            if differs
        )
        return f"also {role}, but series {chosen.series_number} was preferred: {why}"

    return RoleMatch(
        assigned,
        missing,
        tuple(
            Candidate(
                f.series_uid, f.series_number, f.description, role_of.get(f.series_uid), reason(f)
            )
            for f in candidates
        ),
    )


def _modalities(rule: RouteRule, roles: Sequence[str]) -> tuple[str, ...]:
    """The modalities a series fetched for ``roles`` may have; empty when a role takes any."""
    assert rule.roles is not None
    allowed: set[str] = set()
    for role in roles:
        modality = rule.roles[role].modality
        if modality is None:
            return ()
        allowed.update(m.upper() for m in modality)
    return tuple(sorted(allowed))


def _missing(
    decision: Decision,
    rule: RouteRule,
    matched: RoleMatch,
    retrievals: Sequence[Retrieval],
) -> NotRouted:
    """Why a rule lacking roles is not routed, and for a rule that may fetch what is missing,
    what was asked for: a retrieval queued now (with the decision), one still open (the study
    is decided again when it ends), or what the ones that ran brought (never asked again for
    the same roles)."""
    reason = f"missing role(s) {', '.join(matched.missing)}"
    if rule.fetch_missing is None:
        return NotRouted(rule.algorithm, reason, matched.candidates)
    sources = tuple(rule.fetch_missing)
    asked_before = [r for r in retrievals if set(matched.missing) <= set(r.roles)]
    if not asked_before:
        roles = tuple(matched.missing)
        decision.retrievals.append(
            RetrievalRequest(rule.algorithm, roles, _modalities(rule, roles), sources)
        )
        return NotRouted(
            rule.algorithm,
            f"{reason}: asked {', '.join(sources)} for them (retrieval queued)",
            matched.candidates,
            Asked(roles, sources),
        )
    asked = Asked(asked_before[0].roles, sources, tuple(asked_before))
    open_jobs = [r for r in asked_before if r.open]
    if open_jobs:
        jobs = ", ".join(str(r.job_id) for r in open_jobs)
        return NotRouted(
            rule.algorithm,
            f"{reason}: retrieval job(s) {jobs} still open; decided again when they end",
            matched.candidates,
            asked,
        )
    return NotRouted(
        rule.algorithm,
        f"{reason} after retrieval ({'; '.join(r.describe() for r in asked_before)});"
        " not asked again",
        matched.candidates,
        asked,
    )


def decide_study(
    study_uid: str,
    series: list[SeriesFacts],
    rules: list[RouteRule],
    installed: frozenset[str],
    generation: int,
    default_destinations: Sequence[str] = (),
    retrievals: Sequence[Retrieval] = (),
) -> Decision:
    """The decision for a completed study: the rules with roles. ``retrievals`` are the
    study's retrieval jobs (:func:`study_retrievals`): a rule lacking roles that it may fetch
    asks for them once."""
    decision = Decision("study", study_uid, generation)
    usable = [f for f in series if never_routed(f) is None]
    for rule in rules:
        if rule.roles is None:
            continue
        matched = assign_roles(rule.roles, usable)
        mine = [r for r in retrievals if r.algorithm == rule.algorithm]
        if matched.missing:
            decision.not_routed.append(_missing(decision, rule, matched, mine))
        elif rule.algorithm not in installed:
            decision.not_routed.append(
                NotRouted(
                    rule.algorithm,
                    "roles matched, but the algorithm is not installed",
                    matched.candidates,
                )
            )
        else:
            chosen = set(matched.assigned.values())
            # 'sender' means who sent the study, not the PACS a missing series was fetched
            # from (unless everything was fetched).
            pushed = chosen - {uid for r in mine for uid in r.came_series} or chosen
            senders = {aet for f in usable if f.series_uid in pushed for aet in f.calling_aets}
            decision.routed.append(
                Routed(
                    rule.algorithm,
                    matched.assigned,
                    _destinations(rule, default_destinations),
                    tuple(sorted(senders)),
                    matched.candidates,
                    rule.priority,
                    Asked(mine[0].roles, tuple(rule.fetch_missing or ()), tuple(mine))
                    if mine
                    else None,
                )
            )
    return decision


def note_retrievals(
    conn: Connection, study_uid: str, generation: int, retrievals: Sequence[Retrieval]
) -> None:
    """Add to the decision that asked for ``retrievals`` (the study's completion
    ``generation``) how they stand now, in the caller's transaction: a retrieval that brought
    nothing completes the study no more, and its decision is then where its end is read."""
    row = conn.execute(
        "SELECT not_routed FROM routing_decisions WHERE level = 'study' AND subject_uid = ?"
        " AND generation = ?",
        (study_uid, generation),
    ).fetchone()
    if row is None:
        return
    entries = json.loads(row["not_routed"])
    for entry in entries:
        if entry.get("asked") is not None:
            entry["asked"]["retrievals"] = [
                asdict(r) for r in retrievals if r.algorithm == entry["algorithm"]
            ]
    conn.execute(
        "UPDATE routing_decisions SET not_routed = ? WHERE level = 'study' AND subject_uid = ?"
        " AND generation = ?",
        (json.dumps(entries), study_uid, generation),
    )


def study_retrievals(conn: Connection, jobs: Sequence[Job]) -> list[Retrieval]:
    """The retrieval jobs of a study as a decision records them, with what came: the series
    and instances the index marks as fetched by each (:func:`~dicom_node.jobs.retrieved_host`).
    """
    out = []
    for job in sorted(jobs, key=lambda j: j.id):
        assert isinstance(job.payload, RetrievalPayload)
        # A prior is another study's: looked for by the mark alone.
        study = "" if job.payload.prior else " AND study_uid = ?"
        rows = conn.execute(
            "SELECT series_uid, COUNT(*) AS n FROM instances WHERE peer_host = ?"
            f"{study} GROUP BY series_uid ORDER BY MIN(received_at)",
            (retrieved_host(job.id), *(() if job.payload.prior else (job.subject_uid,))),
        ).fetchall()
        out.append(
            Retrieval(
                job.id,
                job.payload.source,
                job.payload.algorithm,
                job.payload.roles,
                job.state.value,
                tuple(r["series_uid"] for r in rows),
                sum(int(r["n"]) for r in rows),
                job.error,
            )
        )
    return out


def record_decision(conn: Connection, jobs: JobStore, decision: Decision) -> list[int]:
    """Store a decision and queue one inference job per routed algorithm (caller's transaction)."""
    cursor = conn.execute(
        "INSERT INTO routing_decisions (level, subject_uid, generation, decided_at, summary,"
        " routed, not_routed) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (level, subject_uid, generation) DO NOTHING",
        (
            decision.level,
            decision.subject_uid,
            decision.generation,
            time.time(),
            decision.summary(),
            json.dumps([asdict(r) for r in decision.routed]),
            json.dumps([asdict(n) for n in decision.not_routed]),
        ),
    )
    if cursor.rowcount == 0:
        return []  # decided before (a replayed job): its inference and retrieval jobs exist
    for request in decision.retrievals:
        for source in request.sources:
            jobs.enqueue(
                conn,
                JobKind.RETRIEVE,
                decision.subject_uid,
                decision.generation,
                RetrievalPayload(source, request.algorithm, request.roles, request.modalities),
            )
    return [
        jobs.enqueue(
            conn,
            JobKind.INFERENCE,
            decision.subject_uid,
            decision.generation,
            InferencePayload(r.algorithm, r.inputs, decision.level, r.destinations, r.senders),
            r.priority,
        )
        for r in decision.routed
    ]


class Router:
    """Turns completion jobs into routing decisions and inference jobs, in a background thread."""

    KINDS = (JobKind.SERIES_COMPLETE, JobKind.STUDY_COMPLETE)
    MAX_ATTEMPTS = 3
    WORKER = "router"  # who holds the routing jobs it claims

    def __init__(
        self,
        data_dir: Path,
        db: Database,
        config: RoutingConfig,
        *,
        installed: Callable[[], frozenset[str]] = installed_algorithms,
        events: Events | None = None,
        algorithm_settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.events = events
        self.db = db
        self.jobs = job_store(db)
        self.config = config
        self.installed = installed
        # The algorithms' sections of the configuration: what prior each wants (its age).
        self.algorithm_settings = dict(algorithm_settings or {})
        # claim and the decision's transaction run under the loop: a locked or unreadable
        # database makes it back off and try again, never ends it.
        self.loop = Loop("router", self._step, 1.0)
        self.deferred = 0  # completions put back to wait for a prior (_wait_for_priors)
        # Called when a decision queued inference jobs (cluster mode: the sweeper stages and
        # rings them at once instead of at its next interval).
        self.on_routed: Callable[[], None] | None = None

    def prior_wanted(self, algorithm: str) -> PriorSpec | None:
        """The prior study ``algorithm`` declares it wants, with its configured settings."""
        registration = discover().get(algorithm)
        cls = registration.algorithm if registration is not None else None
        if cls is None or cls.inputs.prior is None:
            return None
        try:
            return cls.prior_input(cls.checked_settings(self.algorithm_settings.get(algorithm)))
        except ConfigError:
            # `config check` refuses these settings; the worker will fail the job saying so.
            return cls.inputs.prior

    def with_priors(self, decision: Decision) -> Decision:
        """``decision`` with the prior series of each routed algorithm that wants one among
        its inputs (:func:`dicom_node.priors.find_prior`), and what was found or why not."""
        for index, routed in enumerate(decision.routed):
            spec = self.prior_wanted(routed.algorithm)
            if spec is None:
                continue
            found = self._prior_for(decision, routed, spec)
            inputs = dict(routed.inputs)
            if found.series_uid is not None:
                inputs[spec.role] = found.series_uid
            decision.routed[index] = replace(routed, inputs=inputs, prior=found.reason)
        return decision

    def _prior_for(self, decision: Decision, routed: Routed, spec: PriorSpec) -> PriorFound:
        """The prior of a routed algorithm: a series of an earlier study that its rule would
        have chosen for its (first) input."""
        first = next(iter(routed.inputs.values()))
        study = (
            decision.subject_uid if decision.level == "study" else study_of_series(self.db, first)
        )
        match = _input_match(self.config.rules, routed.algorithm, decision.level)
        if study is None or match is None:
            return PriorFound(None, "no prior: no rule input to look for")
        return find_prior(
            self.data_dir,
            self.db,
            study,
            spec,
            lambda facts: (
                never_routed(facts) is None
                and never_a_role(facts) is None
                and mismatch(match, facts) is None
            ),
        )

    def decide(self, job: Job) -> Decision:
        level = "series" if job.kind == JobKind.SERIES_COMPLETE.value else "study"
        if self._a_fetched_prior(level, job.subject_uid):
            return Decision(
                level,
                job.subject_uid,
                job.generation,
                not_routed=[NotRouted("*", "a prior fetched for a later study: not new work")],
            )
        installed = self.installed()
        if job.kind == JobKind.SERIES_COMPLETE.value:
            facts = read_series_facts(self.data_dir, self.db, job.subject_uid)
            return decide_series(
                facts, self.config.rules, installed, job.generation, self.config.destinations
            )
        series = [
            read_series_facts(self.data_dir, self.db, uid)
            for uid in study_series(self.db, job.subject_uid)
        ]
        asked = self.jobs.recent(JobKind.RETRIEVE, subject_uids=[job.subject_uid])
        with self.db.reading() as conn:
            retrievals = study_retrievals(conn, asked)
        return decide_study(
            job.subject_uid,
            series,
            self.config.rules,
            installed,
            job.generation,
            self.config.destinations,
            retrievals,
        )

    def route_next(self) -> Decision | None:
        """Route the oldest waiting completion; None when there is none."""
        job = self.jobs.claim(self.WORKER, self.KINDS)
        if job is None:
            return None
        try:
            decision = self.with_priors(self.decide(job))
            if self._wait_for_priors(job, decision):
                self.deferred += 1
                return None
            with self.db.transaction() as conn:
                inference_jobs = record_decision(conn, self.jobs, decision)
                self.jobs.mark_succeeded(conn, job.id)
        except Exception as exc:
            state = self.jobs.fail(
                job.id,
                f"{type(exc).__name__}: {exc}",
                worker=self.WORKER,
                max_attempts=self.MAX_ATTEMPTS,
            )
            log.exception("routing job %d failed (%s)", job.id, state and state.value)
            return None
        if inference_jobs and self.on_routed is not None:
            self.on_routed()
        if inference_jobs and self.events is not None:
            self.events.emit(self._routed_event(decision, inference_jobs))
        log.info(
            "%s %s generation %d: %s%s",
            decision.level,
            store_key(decision.subject_uid)[:12],
            decision.generation,
            decision.summary(),
            f" (jobs {', '.join(map(str, inference_jobs))})" if inference_jobs else "",
        )
        return decision

    def _step(self) -> bool:
        # Routed one (or put one back to wait for a prior): there may be more waiting. Else
        # wait; completions wake us at once, and the interval is a safety net.
        deferred = self.deferred
        return self.route_next() is not None or self.deferred != deferred

    def _a_fetched_prior(self, level: str, uid: str) -> bool:
        """Whether a series or study came whole from a PACS as another study's prior (its
        instances all marked retrieved, and no retrieval was for its own study): it is there
        for that study's algorithm to compare with, not to be analysed and sent again."""
        study = uid if level == "study" else study_of_series(self.db, uid)
        if study is None:
            return False
        with self.db.reading() as conn:
            row = conn.execute(
                "SELECT COUNT(*) AS n, SUM(CASE WHEN peer_host LIKE ? THEN 1 ELSE 0 END)"
                " AS fetched FROM instances WHERE study_uid = ?",
                (RETRIEVED_MARK + "%", study),
            ).fetchone()
        if not row["n"] or row["fetched"] != row["n"]:
            return False
        return not self.jobs.recent(JobKind.RETRIEVE, subject_uids=[study], limit=1)

    def _wait_for_priors(self, job: Job, decision: Decision) -> bool:
        """Whether the completion waits for a prior to be fetched: an algorithm it routes
        wants a prior that is not on the node, its rule may fetch (``fetch_missing``), and no
        prior was asked for the study before. Then one retrieval job per source is queued
        for the patient's most recent other study within the prior's age, and the completion
        goes back to the queue undecided; the job store holds it there while the retrieval
        is open, and it is decided, once, with what came."""
        study = (
            decision.subject_uid
            if decision.level == "study"
            else study_of_series(self.db, decision.subject_uid)
        )
        if study is None:
            return False
        asked = {
            j.payload.algorithm
            for j in self.jobs.recent(JobKind.RETRIEVE, subject_uids=[study])
            if isinstance(j.payload, RetrievalPayload) and j.payload.prior
        }
        payloads: list[RetrievalPayload] = []
        for routed in decision.routed:
            spec = self.prior_wanted(routed.algorithm)
            if spec is None or spec.role in routed.inputs or routed.algorithm in asked:
                continue
            rule = next(
                (
                    r
                    for r in self.config.rules
                    if r.algorithm == routed.algorithm
                    and r.fetch_missing
                    and (r.series is not None) == (decision.level == "series")
                ),
                None,
            )
            if rule is None:
                continue
            paths = series_paths(self.data_dir, self.db, list(routed.inputs.values())[:1])
            identity = study_identity(paths[0]) if paths else None
            if identity is None or not identity.patient_id or identity.made is None:
                continue
            since = identity.made - timedelta(days=spec.max_age_days)
            match = _input_match(self.config.rules, routed.algorithm, decision.level)
            payloads += [
                RetrievalPayload(
                    source,
                    routed.algorithm,
                    (spec.role,),
                    tuple(sorted(m.upper() for m in (match.modality or ()))) if match else (),
                    identity.patient_id,
                    identity.issuer,
                    f"{since:%Y%m%d}-{identity.made:%Y%m%d}",
                )
                for source in rule.fetch_missing or ()
            ]
        if not payloads:
            return False
        with self.db.transaction() as conn:
            ids = [
                self.jobs.enqueue(conn, JobKind.RETRIEVE, study, job.generation, p)
                for p in payloads
            ]
        waiting = f"waiting for prior retrieval job(s) {', '.join(map(str, ids))}"
        self.jobs.fail(job.id, waiting, worker=self.WORKER, max_attempts=self.MAX_ATTEMPTS)
        log.info(
            "%s %s generation %d: %s",
            decision.level,
            store_key(decision.subject_uid)[:12],
            decision.generation,
            waiting,
        )
        return True

    def _routed_event(self, decision: Decision, job_ids: list[int]) -> JobsRouted:
        """What the audit trail records of a decision that queued jobs: the studies of their
        inputs, and each job with its priority class."""
        paths = series_paths(
            self.data_dir, self.db, (uid for r in decision.routed for uid in r.inputs.values())
        )
        return JobsRouted(
            decision.level,
            study_refs(paths),
            tuple(
                RoutedJob(job_id, r.algorithm, r.priority)
                for job_id, r in zip(job_ids, decision.routed, strict=True)
            ),
        )

    def wake(self, *_: object) -> None:
        self.loop.wake()

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()


def _input_match(rules: Sequence[RouteRule], algorithm: str, level: str) -> SeriesMatch | None:
    """What a rule routing ``algorithm`` at ``level`` asks of its input series: a series rule's
    match, a role rule's first role's (the series its masks are drawn on)."""
    for rule in rules:
        if rule.algorithm != algorithm:
            continue
        if level == "series" and rule.series is not None:
            return rule.series
        if level == "study" and rule.roles is not None:
            return next(iter(rule.roles.values()))
    return None
