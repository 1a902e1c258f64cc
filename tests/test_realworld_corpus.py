"""A real-world corpus through a real node (issue 14, "A real-world corpus in CI").

Public DICOM installed with the test dependencies (``tests/support/realworld.py`` names the sources)
and generated reproductions of each class of failure issue 14 found are sent to
``dicom-node serve`` twice: by dcmtk's storescu, proposing each file's own transfer syntax
(compressed ones included), and by pynetdicom (``dicom_node.scu.send``, the file's bytes as
they are). One node per sender. Each file must end

- acknowledged and processed: indexed, on disk as sent (byte for byte from pynetdicom, element
  for element from storescu, which may re-encode), its series with a recorded routing decision,
  every job that took it succeeded (its objects passing dciodvfy) or failed with a reason in
  the node's words; or
- refused with its PS3.4 status, and the reason in the node's log; or
- for a SOP class the conformance statement does not list, its presentation context rejected;
- or not sent at all where the sender itself cannot read or propose it (said per file).

Each file is a test of its own (``sender:file``), so a failure names the file; a table of every
outcome is printed at the end. Then the logs: no traceback in the node's or the worker's, and
none of the files' patient names, IDs or birth dates above DEBUG.

Open bugs are marked per file, and per sender where only one meets them
(``xfail(strict=True)``, the reason naming the bug): a fixed one then fails as XPASS, and its
mark goes.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info

from dicom_node.config import DEFAULT_ROUTES
from dicom_node.errors import AssociationFailed
from dicom_node.scp import storage_sop_classes
from dicom_node.scu import send
from dicom_node.store import store_key
from tests.support.dicomfiles import assert_same_content, dataset_bytes, dciodvfy
from tests.support.node import NodeProcess, wait_until
from tests.support.peers import STORESCU_PROPOSE
from tests.support.realworld import (
    BIRTH_DATE,
    PATIENT_ID,
    CorpusFile,
    Either,
    Kept,
    NotStored,
    Refused,
    patient_values,
    public_files,
    reproductions,
)

pytestmark = pytest.mark.slow

SENDERS = ("storescu", "pynetdicom")
FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
# The default rules, but radiographs of any body part go to the (cheap) demo CXR model, so that
# the public CRs (hands, spines) are read and written from too, not only routed past.
ROUTES = copy.deepcopy(list(DEFAULT_ROUTES))
for _rule in ROUTES:
    if _rule["algorithm"] == "pneumonia-cxr":
        del _rule["series"]["body_part"]
SETTINGS = {"assembly": FAST, "store": {"fsync": False}, "routing": {"rules": ROUTES}}
# The node's own failures, written in words (dicom_node.algorithm.InputError, write.WriteError).
REASONED_FAILURES = ("InputError: ", "WriteError: ")

# The reproductions are written when the module is collected, so that each file is a test of
# its own; the folder goes at exit, whether or not the tests ran.
GENERATED = Path(tempfile.mkdtemp(prefix="dicom-node-realworld-"))
atexit.register(shutil.rmtree, GENERATED, ignore_errors=True)
FILES = [*public_files(), *reproductions(GENERATED)]
assert len({f.name for f in FILES}) == len(FILES), "two corpus files share a name"


@dataclass
class Outcome:
    """What happened to one file on one sender's node."""

    sent: str = ""  # "ok" (acknowledged), "refused", "rejected" (no context), "skipped", "crash"
    status: int | None = None
    why: str = ""  # the sender's words when not acknowledged


@dataclass
class Run:
    """One sender's pass over the corpus, and the node that received it."""

    sender: str
    node: NodeProcess
    files: list[CorpusFile]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    order: list[CorpusFile] = field(default_factory=list)  # acknowledged, in sending order
    jobs: list[dict] = field(default_factory=list)

    def last_copy(self, uid: str) -> CorpusFile | None:
        """The last acknowledged file holding SOP Instance ``uid``: the copy the node keeps."""
        copies = [f for f in self.order if sop_instance_uid(f.path) == uid]
        return copies[-1] if copies else None


@functools.cache
def sop_instance_uid(path: Path) -> str | None:
    try:
        uid = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get(
            "SOPInstanceUID"
        )
    except Exception:  # a file pydicom cannot read has no UID to look up
        return None
    return str(uid) if uid else None


def header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True, force=True)


# -- sending ----------------------------------------------------------------------------------


def groups(files: list[CorpusFile]) -> dict[str, list[CorpusFile]]:
    """Files by association: each reproduction as one (as a PACS forwards a study), the public
    files all together, as a user sends a folder (the senders split them as they need:
    ``dicom_node.scu`` by 128 presentation contexts, storescu here by transfer syntax)."""
    grouped: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in files:
        grouped["public" if f.name == f.group else f.group].append(f)
    return grouped


def send_pynetdicom(run: Run) -> None:
    for batch in groups(run.files).values():
        by_path = {f.path: f for f in batch}
        try:
            report = send(list(by_path), "127.0.0.1", run.node.port, calling_aet="PYNETDICOM")
        except AssociationFailed as exc:
            for f in batch:
                run.outcomes[f.name] = Outcome("rejected", why=str(exc))
            continue
        except Exception as exc:  # the sender's own bug, recorded per file
            for f in batch:
                run.outcomes[f.name] = Outcome("crash", why=f"{type(exc).__name__}: {exc}")
            continue
        for path in report.sent:
            run.outcomes[by_path[path].name] = Outcome("ok", 0)
            run.order.append(by_path[path])
        for path, why in report.failed:
            match = re.fullmatch(r"status 0x([0-9A-F]{4})", why)
            if match:
                run.outcomes[by_path[path].name] = Outcome("refused", int(match[1], 16), why)
            elif "presentation context" in why:
                run.outcomes[by_path[path].name] = Outcome("rejected", why=why)
            else:  # the sender could not send it, said why, and went on
                run.outcomes[by_path[path].name] = Outcome("skipped", why=why)
        for path, why in report.skipped:
            run.outcomes[by_path[path].name] = Outcome("skipped", why=why)


# storescu -v says "Received Store Response (<DU_cstoreStatusString>)"; the status classes.
_STORESCU_STATUS = {
    "Success": 0x0000,
    "Error: CannotUnderstand": 0xC000,
    "Error: DataSetDoesNotMatchSOPClass": 0xA900,
    "Refused: OutOfResources": 0xA700,
}
_IGNORING = re.compile(r"^W: (.+) in file: (.+?)(?:: [0-9.]+)?, ignoring file$")


def file_syntax(path: Path) -> str:
    """The transfer syntax the file meta names, or "" where it names none."""
    try:
        return dataset_bytes(path)[0]
    except AttributeError:
        return ""


def send_storescu(run: Run) -> None:
    """storescu once per association group and transfer syntax, proposing only what each file
    needs (-R), in the file's own syntax where storescu can propose it."""
    for batch in groups(run.files).values():
        by_syntax: dict[str, list[CorpusFile]] = defaultdict(list)
        for f in batch:
            by_syntax[file_syntax(f.path)].append(f)
        for syntax, files in by_syntax.items():
            if syntax and syntax not in STORESCU_PROPOSE:
                for f in files:
                    run.outcomes[f.name] = Outcome(
                        "skipped", why=f"storescu cannot propose {syntax}"
                    )
                continue
            # No transfer syntax in the meta: storescu works out what it reads.
            propose = STORESCU_PROPOSE[syntax] if syntax else []
            result = run.node.storescu("-v", "-R", "-nh", *propose, files=[f.path for f in files])
            parse_storescu(run, files, result)


def parse_storescu(run: Run, files: list[CorpusFile], result: subprocess.CompletedProcess) -> None:
    by_path = {str(f.path): f for f in files}
    current: CorpusFile | None = None
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("I: Sending file: "):
            current = by_path[line.removeprefix("I: Sending file: ")]
        elif (match := _IGNORING.match(line)) and match[2] in by_path:
            run.outcomes[by_path[match[2]].name] = Outcome("skipped", why=match[1])
        elif line.startswith("I: Received Store Response (") and current is not None:
            text = line.removeprefix("I: Received Store Response (").removesuffix(")")
            status = _STORESCU_STATUS.get(text, -1)
            if status == 0 or text.startswith("Warning"):
                run.outcomes[current.name] = Outcome("ok", status)
                run.order.append(current)
            else:
                run.outcomes[current.name] = Outcome("refused", status, text)
            current = None
        elif line.startswith("E: No presentation context for") and current is not None:
            run.outcomes[current.name] = Outcome("rejected", why=line)
            current = None
        elif line.startswith("E: Store Failed") and current is not None:
            run.outcomes[current.name] = Outcome("crash", why=line)
            current = None
    for f in files:
        if f.name not in run.outcomes:
            last = (result.stdout + result.stderr).strip().splitlines()[-1:]
            kind = "rejected" if "No Acceptable Presentation Contexts" in str(last) else "crash"
            run.outcomes[f.name] = Outcome(kind, why=f"storescu: {last}")


# -- the runs ---------------------------------------------------------------------------------


def settled_jobs(node: NodeProcess) -> list[dict]:
    """Every inference job, once routing has caught up and none is queued or running."""

    def settled() -> list[dict] | None:
        pending = [
            node.query(sql)[0][0]
            for sql in (
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')",
                "SELECT COUNT(*) FROM series WHERE completed_at IS NULL",
                "SELECT COUNT(*) FROM studies WHERE completed_at IS NULL",
            )
        ]
        if any(pending):
            return None
        rows = node.query("SELECT * FROM jobs WHERE kind = 'inference' ORDER BY id")
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows] or [{}]

    jobs = wait_until(settled, 240, "the corpus's jobs to settle", node.log())
    return [j for j in jobs if j]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Run]]:
    """Each sender's run, made the first time a test asks for it; the nodes live for the
    module."""
    made: dict[str, Run] = {}
    broken: dict[str, BaseException] = {}

    class Lazy(dict):
        def __missing__(self, sender: str) -> Run:
            if sender in broken:  # the run failed once: every test of it fails, none re-runs
                raise broken[sender]
            node = NodeProcess(tmp_path_factory.mktemp(f"node-{sender}"), SETTINGS)
            made[sender] = run = Run(sender, node, FILES)
            try:
                node.start()
                (send_storescu if sender == "storescu" else send_pynetdicom)(run)
                run.jobs = settled_jobs(node)
            except BaseException as exc:
                broken[sender] = exc
                raise
            self[sender] = run
            return run

    yield Lazy()
    for run in made.values():
        if run.node.proc is not None and run.node.proc.poll() is None:
            run.node.kill()


# -- per file ---------------------------------------------------------------------------------


# Open bugs one sender meets, to go when they are fixed (strict: a fixed one fails here).
SENDER_BUGS: dict[tuple[str, str], str] = {}


def _params() -> list:
    params = []
    for sender in SENDERS:
        for f in FILES:
            reason = SENDER_BUGS.get((sender, f.name), f.xfail)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(sender, f.name, marks=marks, id=f"{sender}:{f.name}"))
    return params


@pytest.mark.unit
def test_corpus_is_there() -> None:
    """The public sources are installed (pydicom-data is a dev dependency) and whole."""
    public = [f for f in FILES if not f.name.startswith("issue14/")]
    by_source = defaultdict(int)
    for f in public:
        by_source[f.name.split("/")[0]] += 1
    assert by_source["pydicom-data"] >= 60 and by_source["pydicom"] >= 150, dict(by_source)


@pytest.mark.integration
@pytest.mark.parametrize(("sender", "name"), _params())
def test_file(runs: dict[str, Run], sender: str, name: str) -> None:
    run = runs[sender]
    (f,) = [f for f in run.files if f.name == name]
    outcome = run.outcomes.get(name, Outcome("crash", why="the sender never reported it"))
    assert outcome.sent != "crash", f"{sender} failed on it: {outcome.why}"
    if outcome.sent == "skipped":
        if sender == "pynetdicom":  # our own sender sends what dcmtk's does
            other = runs["storescu"].outcomes.get(name)
            assert other is None or other.sent != "ok", (
                f"storescu sends it, we do not: {outcome.why}"
            )
        if isinstance(f.expect, NotStored | Either):
            assert outcome.why, "skipped without a reason"
            return
        pytest.skip(f"{sender} does not send it: {outcome.why}")
    if outcome.sent == "rejected":
        sop_class = str(header(f.path).get("SOPClassUID", ""))
        assert isinstance(f.expect, Either | NotStored), f"context rejected: {outcome.why}"
        assert sop_class not in storage_sop_classes(), (
            f"the node lists {sop_class} yet rejected its context: {outcome.why}"
        )
        return
    if outcome.sent == "refused":
        assert not isinstance(f.expect, Kept), f"refused with {outcome.why}"
        check_refused(run, f, outcome)
        return
    assert not isinstance(f.expect, Refused | NotStored), "acknowledged, not refused"
    check_kept(run, f)


def check_refused(run: Run, f: CorpusFile, outcome: Outcome) -> None:
    assert outcome.status is not None and outcome.status & 0xF000 in (0xA000, 0xC000), (
        f"refused with {outcome.why!r}, not a PS3.4 failure status"
    )
    if isinstance(f.expect, Refused):
        assert outcome.status == f.expect.status, hex(outcome.status)
    # The refusal's line names the instance as the request did (the file meta's UID, or the
    # data set's where a sender takes that), hashed as on disk.
    meta = read_file_meta_info(f.path)  # the data set may be one pydicom cannot read
    named = {meta.get("MediaStorageSOPInstanceUID"), sop_instance_uid(f.path)}
    keys = "|".join(store_key(str(uid))[:12] for uid in named if uid)
    refused = f"C-STORE refused with 0x{outcome.status:04X}, nothing stored"
    line = rf"{refused}: (\S.*) \(instance ({keys}),"
    assert re.search(line, run.node.log()), "no refusal with its reason and instance in the log"
    uid = sop_instance_uid(f.path)
    if uid is not None and run.last_copy(uid) is None:
        assert not run.node.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (uid,)), (
            "refused, yet stored"
        )


def check_kept(run: Run, f: CorpusFile) -> None:
    ds = header(f.path)
    uid = str(ds.SOPInstanceUID)
    rows = run.node.query(
        "SELECT path, series_uid FROM instances WHERE sop_instance_uid = ?", (uid,)
    )
    assert rows, "acknowledged but not indexed"
    stored = run.node.data_dir / rows[0]["path"]
    kept = run.last_copy(uid)
    if kept is f:
        # pynetdicom streams the file as it is, unless its meta names another instance than
        # its data set: then the data set is sent decoded (dicom_node.scu), and re-encoded.
        streamed = ds.file_meta.get("MediaStorageSOPInstanceUID") == uid
        assert_same_content(f.path, stored, byte_identical=run.sender == "pynetdicom" and streamed)
    else:  # several files share the UID (one image in several syntaxes): the latest wins
        assert kept is not None and kept.path != f.path
    series_uid = rows[0]["series_uid"]
    decision = run.node.query(
        "SELECT routed, not_routed FROM routing_decisions WHERE level = 'series'"
        " AND subject_uid = ? ORDER BY generation DESC LIMIT 1",
        (series_uid,),
    )
    assert decision, "its series has no recorded routing decision"
    reasons = " ".join(n["reason"] for n in json.loads(decision[0]["not_routed"]))
    taking = [j for j in run.jobs if series_uid in j["payload"]["inputs"].values()]
    for job in taking:
        check_job(run, f, job)
    if not isinstance(f.expect, Kept):
        return
    if f.expect.routed is not None:
        assert sorted(j["payload"]["algorithm"] for j in taking) == sorted(f.expect.routed), (
            f"taken by {[(j['payload']['algorithm'], j['payload']['inputs']) for j in taking]}"
        )
    if f.expect.role is not None:
        roles = [r for j in taking for r, s in j["payload"]["inputs"].items() if s == series_uid]
        assert roles == [f.expect.role], f"matched as {roles}"
    if f.expect.not_routed is not None:
        assert f.expect.not_routed in reasons, reasons
    if f.expect.routed:  # a reproduction routed to a model must give its results
        assert all(j["state"] == "succeeded" for j in taking), [j["error"] for j in taking]


def check_job(run: Run, f: CorpusFile, job: dict) -> None:
    algorithm = job["payload"]["algorithm"]
    if job["state"] == "failed":
        assert job["error"] and job["error"].startswith(REASONED_FAILURES), (
            f"{algorithm} job failed without a reason in words: {job['error']}"
        )
        return
    assert job["state"] == "succeeded", job
    rows = run.node.query("SELECT kind, path FROM outputs WHERE job_id = ?", (job["id"],))
    outputs = {row["kind"]: run.node.data_dir / row["path"] for row in rows}
    assert outputs, f"{algorithm} succeeded without writing anything"
    # Any source stored and routed gets valid results (issue 14 item 2), public ones too.
    for path in outputs.values():
        verified(path)
    if f.check is not None:
        f.check(outputs)


@functools.cache
def verified(path: Path) -> None:
    """dciodvfy finds no error (once per object: every file of a series shares its job's)."""
    dciodvfy(path)


# -- the logs, and the table ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("sender", SENDERS)
def test_no_traceback_in_the_logs(runs: dict[str, Run], sender: str) -> None:
    """The node's and its worker's log (one stream) hold no traceback and no thread death."""
    log = runs[sender].node.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert "Exception in thread" not in log


@pytest.mark.integration
@pytest.mark.parametrize("sender", SENDERS)
def test_no_patient_data_in_the_logs(runs: dict[str, Run], sender: str) -> None:
    """The node logs at INFO: none of the sent files' patient names, IDs or birth dates."""
    run = runs[sender]
    log = run.node.log()
    values = patient_values(f.path for f in run.files)
    assert {PATIENT_ID, BIRTH_DATE, "Hildegard"} <= values  # the check looks for something
    leaked = sorted(v for v in values if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w.])", log))
    assert not leaked, leaked


@pytest.mark.integration
@pytest.mark.parametrize("sender", SENDERS)
def test_no_uids_in_the_logs(runs: dict[str, Run], sender: str) -> None:
    """Nor the files' study, series or instance UIDs in clear (hashed keys name them)."""
    run = runs[sender]
    log = run.node.log()
    uids: set[str] = set()
    for f in run.files:
        try:
            ds = header(f.path)
        except Exception:  # unreadable: its UIDs are looked up by its meta alone
            ds = Dataset()
            ds.file_meta = read_file_meta_info(f.path)
        found = [ds.file_meta.get("MediaStorageSOPInstanceUID")]
        found += [ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        uids.update(str(uid) for uid in found if uid and len(str(uid)) >= 10)
    leaked = sorted(
        u for u in uids if u in log and re.search(rf"(?<![\w.]){re.escape(u)}(?![\w.])", log)
    )
    assert not leaked, leaked


@pytest.mark.integration
def test_outcome_table(runs: dict[str, Run], capsys) -> None:
    """Last: the table of what became of each file, per sender (printed, not captured)."""
    counts: dict[str, dict[str, int]] = {}
    lines = [f"{'file':72} " + " ".join(f"{s:24}" for s in SENDERS)]
    for f in FILES:
        cells = []
        for sender in SENDERS:
            o = runs[sender].outcomes.get(f.name, Outcome("crash", why="not reported"))
            cell = o.sent if o.status is None else f"{o.sent} 0x{o.status:04X}"
            counts.setdefault(sender, defaultdict(int))[o.sent] += 1
            cells.append(f"{cell:24}")
        lines.append(f"{f.name[:72]:72} " + " ".join(cells))
    jobs = {s: len(runs[s].jobs) for s in SENDERS}
    lines.append(f"{len(FILES)} files; outcomes { ({s: dict(c) for s, c in counts.items()}) }")
    lines.append(f"inference jobs {jobs}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(sum(c.values()) == len(FILES) for c in counts.values())
