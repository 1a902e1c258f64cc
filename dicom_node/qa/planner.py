"""Which phantom goes to which algorithm: the node's own routing decisions on the phantoms'
series facts, and what the configuration lacks for qa to test it (with the YAML to add)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.algorithm import QaCase
from dicom_node.config import SENDER, NodeConfig, RouteRule
from dicom_node.errors import QaUnusable
from dicom_node.facts import SeriesFacts, describe_series
from dicom_node.qa.phantom import Phantom
from dicom_node.qa.report import Check
from dicom_node.route import Routed, decide_series, decide_study

__all__ = ["SUGGESTED_PORT", "Plan", "config_problems", "plan", "select_algorithms"]

SUGGESTED_PORT = 11190  # for the peers entry qa proposes when there is none


@dataclass(frozen=True)
class Plan:
    """What the node's rules will do with one phantom: the facts the node will read from its
    series once stored, the routes to its algorithm, and why not when there are none."""

    facts: tuple[SeriesFacts, ...]  # one per series, in the phantom's role order
    routes: tuple[Routed, ...]
    why_not: str | None

    @property
    def destinations(self) -> set[str]:
        return {d for r in self.routes for d in r.destinations}


def plan(phantom: Phantom, config: NodeConfig, installed: frozenset[str], aet: str) -> Plan:
    """Run the node's own routing decisions on the phantom's facts (series rules, then the
    study's role rules), as the node will when the study completes. The facts are the node's
    own reading (:func:`dicom_node.facts.describe_series`) of the files qa sends, as if they
    had come from ``aet``."""
    facts = [
        describe_series(phantom.series[role], calling_aets=frozenset({aet}))
        for role in phantom.series
    ]
    rules, defaults = config.routing.rules, config.routing.destinations
    decisions = [decide_series(f, rules, installed, 1, defaults) for f in facts]
    decisions.append(decide_study(facts[0].study_uid, facts, rules, installed, 1, defaults))
    routes = tuple(r for d in decisions for r in d.routed if r.algorithm == phantom.algorithm)
    reasons = [
        n.reason for d in decisions for n in d.not_routed if n.algorithm in (phantom.algorithm, "*")
    ]
    return Plan(
        tuple(facts), routes, None if routes else "; ".join(dict.fromkeys(reasons)) or "no rule"
    )


def select_algorithms(
    config: NodeConfig,
    installed: frozenset[str],
    cases: Mapping[str, QaCase],
    requested: Sequence[str] | None,
) -> tuple[list[str], list[Check]]:
    """The algorithms to test (those of ``cases``, the installed algorithms' self-tests, that
    a rule routes to), and SKIP rows for those that cannot be; a request qa cannot honour is
    :class:`QaUnusable`."""
    ruled = {rule.algorithm for rule in config.routing.rules}
    if requested:
        unknown = [a for a in requested if a not in cases]
        if unknown:
            raise QaUnusable(f"no phantom for {', '.join(unknown)}; qa tests {', '.join(cases)}")
        for name in requested:
            if name not in ruled:
                raise QaUnusable(f"no rule in routing.rules routes to {name}")
        return list(dict.fromkeys(requested)), []
    chosen = [a for a in cases if a in ruled]
    skipped = [Check(a, "selected", "SKIP", "no rule routes it") for a in cases if a not in chosen]
    skipped += [
        Check(
            a, "selected", "SKIP", "installed and routed, but no self-test (it declares no QaCase)"
        )
        for a in sorted((installed & ruled) - cases.keys())
    ]
    if not cases:
        raise QaUnusable("no installed algorithm declares a self-test (see dicom-node algorithms)")
    if not chosen:
        raise QaUnusable(
            "none of the algorithms qa has phantoms for "
            f"({', '.join(cases)}) is both installed and routed by the configuration"
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
