"""The ``dicom-node`` command.

Exit codes: 0 success, 1 the operation failed (a peer refused, a send had failures),
2 unusable configuration or command line, 141 the reader of the output went away.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node import __version__
from dicom_node.config import ENV_CONFIG_FILE, NodeConfig, config_as_yaml, load_config
from dicom_node.errors import ConfigError
from dicom_node.logs import setup_logging

if TYPE_CHECKING:  # the commands import what they run when they run it
    from dicom_node.algorithm import SeriesInput
    from dicom_node.database import Database
    from dicom_node.jobs import JobStore

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command killed by SIGPIPE

log = logging.getLogger("dicom_node")


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.node import Node

    config = _config(args)
    setup_logging(config.logging.level)
    source = args.config or os.environ.get(ENV_CONFIG_FILE)
    node = Node(
        config, config_source=str(Path(source).resolve()) if source else "embedded defaults"
    )
    node.serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    config = _config(args)
    name = args.name or f"worker-{socket.gethostname()}-{os.getpid()}"
    if args.cluster:
        from dicom_node.cluster_worker import cluster_worker_main
        from dicom_node.logs import setup_logging

        if not config.cluster.enabled:
            raise ConfigError(
                "cluster.database_url: not set (worker --cluster is for cluster mode)"
            )
        setup_logging(config.logging.level, process="[worker]")
        return cluster_worker_main(config, name, args.processes)
    if args.processes is not None:
        print("dicom-node: --processes is for worker --cluster", file=sys.stderr)
        return EXIT_USAGE
    from dicom_node.infer import worker_main

    worker_main(config, name)
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.errors import AssociationFailed
    from dicom_node.scu import echo

    try:
        status = echo(args.host, args.port, calling_aet=args.aet, called_aet=args.aec)
    except (AssociationFailed, OSError) as exc:
        print(f"echo failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else EXIT_FAILED


def cmd_send(args: argparse.Namespace) -> int:
    """One line per file not sent (the path as given and why, never a value from the file),
    as it happens; then the counts. Exit 1 when any file failed or the peer could not be
    reached; files skipped as not DICOM are no failure."""
    from dicom_node.errors import SendAbandoned
    from dicom_node.scu import SendReport, send

    def say(outcome: str, path: Path, why: str) -> None:
        if outcome != "sent":
            print(f"{outcome} {path}: {why}", file=sys.stderr, flush=True)

    abandoned = False
    try:
        report = send(
            [Path(p) for p in args.paths],
            args.host,
            args.port,
            calling_aet=args.aet,
            called_aet=args.aec,
            on_outcome=say,
        )
    except (SendAbandoned, OSError) as exc:
        print(f"send failed: {exc}", file=sys.stderr)
        report, abandoned = getattr(exc, "report", SendReport()), True
    print(f"sent {len(report.sent)}, failed {len(report.failed)}, skipped {len(report.skipped)}")
    return EXIT_FAILED if report.failed or abandoned else 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.status import build_report, format_report

    config = _config(args)
    report = build_report(config, recent=args.recent)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node.database import has_database, open_database
    from dicom_node.jobs import DeliveryState, JobKind, JobState, job_store

    config = _config(args)
    if not has_database(config):
        print(f"no data under {config.store.data_dir.resolve()}")
        return 0
    db = open_database(config)
    store = job_store(db)
    try:
        if args.action == "retry":
            if (args.job is None) == (not args.all_dead):
                print("dicom-node: give a job ID or --all-dead", file=sys.stderr)
                return EXIT_USAGE
            count = store.replay_deliveries(job_id=args.job, all_dead=args.all_dead)
            print(f"{count} deliver{'y' if count == 1 else 'ies'} queued again")
            return 0 if count else EXIT_FAILED
        if args.action in ("cancel", "requeue"):
            if args.job is None:
                print(f"dicom-node: give the ID of the job to {args.action}", file=sys.stderr)
                return EXIT_USAGE
            return _control_job(config, db, store, args.action, args.job)
        jobs = store.recent(JobKind.INFERENCE, limit=args.recent)
        deliveries = store.deliveries_of([j.id for j in jobs])
    finally:
        db.close()
    if args.json:
        listing = [
            {
                "job": j.id,
                "algorithm": j.inference.algorithm,
                "state": j.state.value,
                "priority": j.priority,
                "attempts": j.attempts,
                "error": j.error,
                "deliveries": [
                    {
                        "destination": d.label,
                        "state": d.state.value,
                        "attempts": d.attempts,
                        "last_error": d.last_error,
                    }
                    for d in deliveries.get(j.id, [])
                ],
            }
            for j in jobs
        ]
        print(json.dumps(listing, indent=2))
        return 0
    for j in jobs:
        error = f"  {j.error}" if j.state in (JobState.FAILED, JobState.CANCELLED) else ""
        print(
            f"job {j.id:>5}  {j.inference.algorithm:<20} {j.priority:<7} {j.state.value:<9}{error}"
        )
        for d in deliveries.get(j.id, []):
            why = f"  {d.last_error}" if d.state is not DeliveryState.SENT and d.last_error else ""
            print(f"    -> {d.label:<24} {d.state.value:<8} {d.attempts} attempt(s){why}")
    return 0


def _control_job(config: NodeConfig, db: Database, store: JobStore, action: str, job: int) -> int:
    """Cancel or requeue a job, audited in the node's audit trail as the user running this."""
    import getpass

    from dicom_node.audit import AuditTrail
    from dicom_node.events import Events
    from dicom_node.job_control import JobControl

    data_dir = config.store.data_dir.resolve()
    events, audit = Events(), None
    if config.audit.enabled:
        audit = AuditTrail(config.audit, data_dir, config.scp.ae_title)
        events.sinks.append(audit)
    control = JobControl(store, db, data_dir, events)
    act = control.cancel if action == "cancel" else control.requeue
    try:
        outcome = act(job, requestor=getpass.getuser(), host=socket.gethostname())
    finally:
        if audit is not None:
            audit.close()
    print(outcome.message, file=sys.stdout if outcome.changed else sys.stderr)
    return 0 if outcome.changed else EXIT_FAILED


def cmd_algorithms(args: argparse.Namespace) -> int:
    from dicom_node.plugins import catalogue, discover, resolve_device

    config = _config(args)
    rows = catalogue(discover(), config.algorithms, resolve_device(config.worker.device))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no algorithms installed (entry-point group dicom_node.algorithms)")
    for row in [] if args.json else rows:
        if "version" in row:
            print(
                f"{row['name']} {row['version']}  inputs: {', '.join(row['inputs'])}"
                f"  device: {row['device']}"
            )
        else:
            print(f"{row['name']} ({row['entry_point']})")
        print(f"    {'ERROR: ' + row['error'] if 'error' in row else 'weights: ' + row['weights']}")
    return EXIT_FAILED if any("error" in row for row in rows) else 0


def cmd_run(args: argparse.Namespace) -> int:
    from dicom_node.algorithm import SeriesInput
    from dicom_node.infer import made_by
    from dicom_node.plugins import discover, resolve_device
    from dicom_node.write import Provenance

    config = _config(args)
    registration = discover().get(args.algorithm)
    if registration is None or registration.algorithm is None:
        why = registration.error if registration else "not installed (see dicom-node algorithms)"
        print(f"algorithm {args.algorithm}: {why}", file=sys.stderr)
        return EXIT_FAILED
    algorithm = registration.algorithm(config.algorithms.get(args.algorithm))
    roles = algorithm.inputs.roles
    given = dict(item.split("=", 1) for item in args.input) if args.input else {}
    by_role = roles != ("series",)
    # An algorithm that follows lesions up also takes its prior: --input prior=FOLDER.
    if (given and algorithm.inputs.mismatch(given) is not None) or not (given or args.paths):
        prior = algorithm.inputs.prior
        print(
            f"{args.algorithm} takes {', '.join(roles)}: give a study folder, or"
            " --input ROLE=FOLDER for each"
            + (f" (and optionally --input {prior.role}=FOLDER)" if prior else ""),
            file=sys.stderr,
        )
        return EXIT_USAGE
    cases: list[dict[str, SeriesInput]] = []
    if given:
        cases.append(
            {role: SeriesInput(role, tuple(_files([Path(p)]))) for role, p in given.items()}
        )
    elif by_role:  # one case: the study's series matched to roles as the node does
        case = _match_roles(config, args.algorithm, [Path(p) for p in args.paths])
        if case is None:
            return EXIT_FAILED
        cases.append(case)
    else:  # one case per series found under the paths
        cases += [
            {"series": SeriesInput(uid, tuple(paths))}
            for uid, paths in _series_files([Path(p) for p in args.paths]).items()
        ]
    algorithm.load(resolve_device(config.worker.device))
    # Who made the results, as the worker says it: the registered class and its weights.
    cls = registration.algorithm
    provenance = Provenance(cls.name, cls.version, algorithm.weights())
    failed = 0
    for number, inputs in enumerate(cases, 1):
        out = Path(args.out) / f"case-{number:03d}"
        try:
            path = made_by(algorithm.run(inputs), provenance).save(out)
        except Exception as exc:
            failed += 1
            print(f"case {number}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(f"case {number}: {path}")
    return EXIT_FAILED if failed or not cases else 0


def _files(paths: list[Path]) -> list[Path]:
    from dicom_node.scu import find_files

    return list(find_files(paths))


def _series_files(paths: list[Path]) -> dict[str, list[Path]]:
    """The DICOM files under ``paths`` by Series Instance UID (files without one are left out)."""
    by_series: dict[str, list[Path]] = {}
    for path in _files(paths):
        try:
            uid = str(dcmread_uid(path))
        except Exception:
            continue
        by_series.setdefault(uid, []).append(path)
    return by_series


def _match_roles(config: NodeConfig, name: str, paths: list[Path]) -> dict[str, SeriesInput] | None:
    """Give the algorithm's roles to the series under ``paths`` with the node's own facts and
    role rule (routing.rules), print which series got which role and why every other did not,
    and return the case; None (after saying why) when a role finds no series."""
    from dicom_node.algorithm import SeriesInput
    from dicom_node.facts import describe_series
    from dicom_node.route import assign_roles, never_routed

    rule = next((r for r in config.routing.rules if r.algorithm == name and r.roles), None)
    if rule is None or rule.roles is None:
        print(f"no rule with roles routes to {name} (routing.rules)", file=sys.stderr)
        return None
    files = _series_files(paths)
    facts = [describe_series(series, series_uid=uid) for uid, series in files.items()]
    facts.sort(key=lambda f: (f.series_number is None, f.series_number or 0))
    usable = [f for f in facts if never_routed(f) is None]
    matched = assign_roles(rule.roles, usable)
    why = {c.series_uid: c for c in matched.candidates}
    for f in facts:
        label = f"series {f.series_number if f.series_number is not None else '?'}"
        label += f" {f.description!r}"
        candidate = why.get(f.series_uid)
        if candidate is None:
            print(f"{label}: not an image for {name}: {never_routed(f)}")
        elif candidate.role:
            print(f"{label}: {candidate.role} ({candidate.reason})")
        else:
            print(f"{label}: no role ({candidate.reason})")
    if matched.missing:
        print(f"{name}: missing role(s) {', '.join(matched.missing)}", file=sys.stderr)
        return None
    return {role: SeriesInput(role, tuple(files[uid])) for role, uid in matched.assigned.items()}


def dcmread_uid(path: Path) -> str:
    from pydicom import dcmread

    uid: str = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])[
        "SeriesInstanceUID"
    ].value
    return uid


def cmd_qa(args: argparse.Namespace) -> int:
    from dicom_node.config import ENV_CONFIG_FILE
    from dicom_node.qa import QaOptions, run_qa

    config = _config(args)
    setup_logging("WARNING")  # the report is the output; logs only for what went wrong
    source = args.config or os.environ.get(ENV_CONFIG_FILE)
    options = QaOptions(
        host=args.host,
        port=args.port,
        called_aet=args.aec,
        calling_aet=args.aet,
        algorithms=tuple(args.algorithms) if args.algorithms else None,
        timeout_s=args.timeout,
        as_json=args.json,
        keep=Path(args.keep) if args.keep else None,
        config_name=source or "the configuration (no file: the embedded defaults)",
    )
    return run_qa(config, options)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference":
        from dicom_node.config_reference import configuration_reference

        print(configuration_reference(), end="")
        return 0
    config = _config(args)
    if args.action == "show":
        print(config_as_yaml(config), end="")
    else:
        from dicom_node.plugins import check_settings, discover

        check_settings(discover(), config.algorithms)  # the plugins' sections too
        print("configuration OK")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from dicom_node.conformance import TABLES, region, rewrite
    from dicom_node.errors import ConformanceDocError

    if args.write is None:
        print("\n\n".join(region(name) for name in TABLES))
        return 0
    path = Path(args.write)
    text = path.read_text()
    try:
        new = rewrite(text)
    except ConformanceDocError as exc:
        print(f"dicom-node: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if new == text:
        print(f"{path}: generated tables up to date")
    else:
        path.write_text(new)
        print(f"{path}: generated tables rewritten")
    return 0


# `dicom-node cluster <action>`: each action is one function registered with @cluster_command
# (its name, help, and a function adding its arguments); build_parser adds them all.
ClusterAction = Callable[[argparse.Namespace], int]
_CLUSTER_ACTIONS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], ClusterAction]
] = {}


def cluster_command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
) -> Callable[[ClusterAction], ClusterAction]:
    def register(func: ClusterAction) -> ClusterAction:
        _CLUSTER_ACTIONS[name] = (help, arguments, func)
        return func

    return register


def _cluster_config(args: argparse.Namespace) -> NodeConfig:
    config = _config(args)
    if not config.cluster.enabled:
        raise ConfigError("cluster.database_url: not set (this command is for cluster mode)")
    return config


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-sqlite",
        metavar="PATH",
        required=True,
        type=Path,
        help="the embedded node's index (<store.data_dir>/index.sqlite3), with the node stopped",
    )


@cluster_command(
    "migrate",
    "copy an embedded node's SQLite index into the cluster's empty PostgreSQL database",
    _migrate_arguments,
)
def cmd_cluster_migrate(args: argparse.Namespace) -> int:
    from dicom_node.database_postgres import PostgresDatabase, migrate_from_sqlite

    config = _cluster_config(args)
    assert config.cluster.database_url is not None
    db = PostgresDatabase(config.cluster.database_url)
    try:
        copied = migrate_from_sqlite(args.from_sqlite, db)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        db.close()
    for table, rows in copied.items():
        print(f"{table}: {rows} rows")
    print(f"migrated {sum(copied.values())} rows from {args.from_sqlite}")
    return 0


@cluster_command(
    "check",
    "check PostgreSQL, RabbitMQ and the object store from this host (one line each)",
)
def cmd_cluster_check(args: argparse.Namespace) -> int:
    from dicom_node.cluster_check import cluster_checks, limits_note
    from dicom_node.cluster_worker import installed_algorithms

    config = _cluster_config(args)
    lines = cluster_checks(config, installed_algorithms())
    for line in lines:
        print(line)
    note = limits_note(config)
    if note is not None:
        print(f"note: {note}")
    return 0 if all(line.ok for line in lines) else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", "-c", help="YAML configuration file (default: $DICOM_NODE_CONFIG, or none)"
        )
        return p

    serve = with_config(commands.add_parser("serve", help="run the node until SIGINT/SIGTERM"))
    serve.set_defaults(func=cmd_serve)

    worker = with_config(
        commands.add_parser("worker", help="run an inference worker on its own (no SCP)")
    )
    worker.add_argument("--name", help="worker name in the job store (default host-pid)")
    worker.add_argument(
        "--cluster",
        action="store_true",
        help="a cluster worker host: take jobs through RabbitMQ and PostgreSQL, inputs and"
        " results through the object store (the cluster: section)",
    )
    worker.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="with --cluster: worker processes (default: one per GPU, as worker.processes says)",
    )
    worker.set_defaults(func=cmd_worker)

    def scu(p: argparse.ArgumentParser, *, positional_peer: bool) -> None:
        if positional_peer:
            p.add_argument("host")
            p.add_argument("port", type=int)
        else:
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=11112)
        p.add_argument("--aet", default="DICOMNODE_SCU", help="our (calling) AE title")
        p.add_argument("--aec", default="DICOMNODE", help="the peer's (called) AE title")

    echo = commands.add_parser("echo", help="C-ECHO a DICOM peer")
    scu(echo, positional_peer=True)
    echo.set_defaults(func=cmd_echo)

    send = commands.add_parser("send", help="C-STORE files or folders (recursive) to a peer")
    send.add_argument("paths", nargs="+", metavar="PATH")
    scu(send, positional_peer=False)
    send.set_defaults(func=cmd_send)

    status = with_config(commands.add_parser("status", help="what the node has received"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--recent", type=int, default=20, help="how many series to list")
    status.set_defaults(func=cmd_status)

    jobs = with_config(
        commands.add_parser(
            "jobs",
            help="inference jobs and their deliveries; replay dead ones, cancel or requeue a job",
        )
    )
    jobs.add_argument(
        "action", nargs="?", choices=["list", "retry", "cancel", "requeue"], default="list"
    )
    jobs.add_argument(
        "job",
        nargs="?",
        type=int,
        help="retry: the job whose deliveries to redo; cancel: a queued or running job;"
        " requeue: a failed or cancelled job",
    )
    jobs.add_argument("--all-dead", action="store_true", help="retry: every dead delivery")
    jobs.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.add_argument("--recent", type=int, default=50, help="how many jobs to list")
    jobs.set_defaults(func=cmd_jobs)

    algorithms = with_config(
        commands.add_parser("algorithms", help="installed algorithms, their weights and device")
    )
    algorithms.add_argument("--json", action="store_true", help="machine-readable output")
    algorithms.set_defaults(func=cmd_algorithms)

    run = with_config(
        commands.add_parser("run", help="offline inference on files, results as JSON + NumPy")
    )
    run.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files/folders: one case a series, or for study algorithms one study whose"
        " series get their roles as the node gives them",
    )
    run.add_argument("--algorithm", required=True)
    run.add_argument(
        "--input",
        action="append",
        metavar="ROLE=PATH",
        help="for study algorithms: the folder of each role, instead of matching them; for"
        " one that follows lesions up (lung-nodules-ct), also prior=FOLDER: the prior study",
    )
    run.add_argument("--out", required=True, help="folder for case-NNN/result.json")
    run.set_defaults(func=cmd_run)

    qa = with_config(
        commands.add_parser(
            "qa", help="commissioning self-test: phantom studies through the running node"
        )
    )
    qa.add_argument("--host", help="the node's address (default: scp.host; loopback for 0.0.0.0)")
    qa.add_argument("--port", type=int, help="the node's port (default: scp.port)")
    qa.add_argument("--aec", help="the node's AE title (default: scp.ae_title)")
    qa.add_argument(
        "--aet", default="DICOMNODE_QA", help="our calling AE title; results come back to it"
    )
    qa.add_argument(
        "--algorithms",
        action="extend",
        type=lambda text: [name for name in text.split(",") if name],
        metavar="NAME[,NAME]",
        help="test only these (default: every installed algorithm the configuration routes)",
    )
    qa.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for results after sending"
    )
    qa.add_argument("--json", action="store_true", help="machine-readable output")
    qa.add_argument("--keep", metavar="DIR", help="keep the phantoms and the results in DIR")
    qa.set_defaults(func=cmd_qa)

    config = with_config(commands.add_parser("config", help="show or check the configuration"))
    config.add_argument(
        "action",
        choices=["show", "check", "reference"],
        help="show: effective configuration; check: validate; reference: every key (Markdown)",
    )
    config.set_defaults(func=cmd_config)

    conformance = commands.add_parser(
        "conformance", help="the conformance statement's tables, generated from the code"
    )
    conformance.add_argument(
        "action", choices=["tables"], help="tables: SOP classes and transfer syntaxes (Markdown)"
    )
    conformance.add_argument(
        "--write",
        metavar="FILE",
        help="rewrite the generated regions of FILE (docs/conformance.md) in place",
    )
    conformance.set_defaults(func=cmd_conformance)

    cluster = commands.add_parser(
        "cluster", help="cluster mode: check its servers, migrate an embedded node"
    )
    actions = cluster.add_subparsers(dest="action", required=True)
    for name, (text, arguments, func) in _CLUSTER_ACTIONS.items():
        action = with_config(actions.add_parser(name, help=text))
        arguments(action)
        action.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return code
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader stopped reading (`dicom-node status | head`): end quietly, as a command
        # killed by SIGPIPE would. Python's recipe (library/signal, "Note on SIGPIPE"):
        # stdout points at /dev/null so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
