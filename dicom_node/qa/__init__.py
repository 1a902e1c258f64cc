"""``dicom-node qa``: the commissioning self-test hospital IT runs against an installed node.

It acts as a modality and as the PACS at once. Phantom studies with known truth, each the
self-test an installed algorithm declares (:class:`~dicom_node.algorithm.QaCase`), for the
algorithms the node's configuration routes are sent to the *running* node by C-STORE (PS3.4
B.2) under qa's own calling AE title; a temporary Storage SCP, listening where the node's
``peers`` entry for that AE title says, receives the results the node sends back to the
``sender``. Each study's results are then checked: that they arrived, that they belong to the
study and patient sent, that the Segmentation's frames derive from the images sent and lie on
the phantom's truth, that the TID 1500 report's measurements reference the right images, and
that dciodvfy finds no error in any object. An algorithm that declares no self-test is listed
as a SKIP.

Exit status: 0 when no check failed, 1 when one did (or the node is unreachable), 2 when the
configuration cannot be tested as it is (then the YAML to add is printed) or the command line
is wrong.

The package's modules are its seams: :mod:`~dicom_node.qa.phantom` (the studies sent and
their truth), :mod:`~dicom_node.qa.planner` (what the node's routing will do with them),
:mod:`~dicom_node.qa.peer` (the DICOM side: the node's address and the storage SCP the
results come back to), :mod:`~dicom_node.qa.verifier` (the checks on the results) and
:mod:`~dicom_node.qa.report` (the table and the exit status); this module runs them in turn.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from dicom_node.config import SENDER, AeTitle, NodeConfig
from dicom_node.errors import QaUnusable
from dicom_node.plugins import discover
from dicom_node.qa.notify import notification_checks
from dicom_node.qa.peer import QA_AE_TITLE, ResultReceiver, address_towards, node_address
from dicom_node.qa.phantom import Phantom, self_tests
from dicom_node.qa.planner import Plan, config_problems, plan, select_algorithms
from dicom_node.qa.report import (
    EXIT_UNUSABLE,
    Check,
    exit_status,
    print_report,
    print_unusable,
)
from dicom_node.qa.verifier import evaluate

__all__ = ["QaOptions", "run_qa"]


@dataclass(frozen=True)
class QaOptions:
    """What ``dicom-node qa``'s command line says: the node's address and AE titles (default:
    from the configuration), the algorithms to test (default: every one qa can), how long to
    wait for results, JSON output, and a folder to keep what was sent and received."""

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


def run_qa(config: NodeConfig, options: QaOptions) -> int:
    """The whole self-test; prints the report and returns the exit status."""
    aet = options.calling_aet.strip()
    host, port = node_address(config, options.host, options.port)
    called = options.called_aet or config.scp.ae_title
    try:
        for title in (aet, called):
            try:
                TypeAdapter(AeTitle).validate_python(title)
            except ValidationError:
                raise QaUnusable(f"{title!r} is not a valid AE title (PS3.5 6.2)") from None
        registry = discover()
        installed = frozenset(n for n, r in registry.items() if r.algorithm is not None)
        cases = self_tests(registry)
        chosen, skipped = select_algorithms(config, installed, cases, options.algorithms)
    except QaUnusable as exc:
        print(f"dicom-node qa: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    with _workdir(options.keep) as work:
        phantoms = [Phantom.make(name, cases[name], work / "sent") for name in chosen]
        plans = {p.algorithm: plan(p, config, installed, aet) for p in phantoms}
        problems, snippet = config_problems(config, plans, aet, address_towards(host))
        if problems:
            print_unusable(options.config_name, problems, snippet)
            return EXIT_UNUSABLE
        peer = config.peers[aet]
        receiver = ResultReceiver(aet, work / "received")
        try:
            bound = receiver.listen(peer.host, peer.port)
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
    print_report(checks, header, options.as_json)
    return exit_status(checks)


def _exercise(
    config: NodeConfig,
    options: QaOptions,
    phantoms: list[Phantom],
    plans: dict[str, Plan],
    receiver: ResultReceiver,
    node: tuple[str, int, str],
) -> list[Check]:
    """C-ECHO, then send every phantom, wait for the results, and check them."""
    from dicom_node.errors import AssociationFailed
    from dicom_node.scu import echo, send

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
    routed = {p.algorithm: (study[p.algorithm], plans[p.algorithm].destinations) for p in waiting}
    checks += notification_checks(config, routed, host, deadline)
    return checks
