"""`dicom-node qa` against real nodes: a correctly configured node passes; a configuration that
would not send results back is refused with the YAML that fixes it (and that YAML works); a
node that delivers nothing, or is not there, fails; and the geometry checks catch a SEG or SR
whose references are off."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from dicom_node.algorithm import SERIES_INPUT, QaLesion, QaPhantom
from dicom_node.qa.peer import QA_AE_TITLE
from dicom_node.qa.phantom import Phantom
from dicom_node.qa.verifier import check_seg_references, check_seg_truth, check_sr_truth
from dicom_node.testing import free_port
from dicom_node_algorithms.lung_nodules_ct import CT_SPEC, NODULE, LungNodulesCt
from tests.support.node import NodeProcess

pytestmark = pytest.mark.integration

FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
SEND_BACK = {"destinations": ["sender"]}


def peers() -> dict:
    return {QA_AE_TITLE: {"host": "127.0.0.1", "port": free_port()}}


def run_qa(config: Path, *options: str, timeout_s: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "qa", "--config", str(config), *options],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def rows(stdout: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The report's table: (study, check) -> (result, detail)."""
    table = {}
    for line in stdout.splitlines()[2:]:
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        if len(parts) == 4:
            table[(parts[0], parts[1])] = (parts[2], parts[3])
    return table


PER_STUDY = {
    "lung-nodules-ct": ["SEG references", "SEG on truth", "SR references", "SR on truth",
                        "dciodvfy SEG", "dciodvfy SR"],
    "brain-tumour-mr": ["SEG references", "SEG on truth", "SR references", "SR on truth",
                        "dciodvfy SEG", "dciodvfy SR"],
    "pneumonia-cxr": ["SR references", "SR on truth", "SC grid", "dciodvfy SR", "dciodvfy SC"],
}  # fmt: skip


def test_a_node_that_sends_results_back_passes(make_node, tmp_path) -> None:
    node = make_node(assembly=FAST, peers=peers(), routing=SEND_BACK)
    keep = tmp_path / "qa"
    done = run_qa(node.config_path, "--keep", str(keep), "--timeout", "240")
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    assert table[("node", "C-ECHO")][0] == "PASS"
    for algorithm, checks in PER_STUDY.items():  # every installed algorithm the rules route
        common = ["routing (config)", "C-STORE", "results arrived", "study and patient"]
        for check in common + checks:
            assert table[(algorithm, check)][0] == "PASS", (algorithm, check, done.stdout)
    assert "0 error(s)" in table[("lung-nodules-ct", "dciodvfy SEG")][1]
    assert done.stdout.rstrip().splitlines()[-1].startswith("verdict: PASS")
    # The phantoms went in as DICOMNODE_QA and came back to it, through the node's store.
    sent = node.query("SELECT DISTINCT calling_aet FROM instances")
    assert [r[0] for r in sent] == [QA_AE_TITLE]
    delivered = node.query("SELECT destination, peer_aet, state FROM deliveries")
    assert [tuple(r) for r in delivered] == [("sender", QA_AE_TITLE, "sent")] * 3
    assert_geometry_checks_catch_misplaced_references(keep, tmp_path)


def assert_geometry_checks_catch_misplaced_references(keep: Path, tmp_path: Path) -> None:
    """The CT's SEG and SR as the node delivered them pass; the same objects with every image
    reference moved 8 slices (10 mm) fail, as a writer that mixed up slices would."""
    assert LungNodulesCt.qa_case is not None
    sent = tuple(sorted((keep / "sent" / "lung-nodules-ct").glob("*.dcm")))
    (nodule,) = CT_SPEC.nodules
    truth = QaLesion(NODULE, nodule.center_lps_mm, nodule.diameter_mm, CT_SPEC.nodule_mask())
    phantom = Phantom(
        "lung-nodules-ct", LungNodulesCt.qa_case, QaPhantom({SERIES_INPUT: sent}, lesions=(truth,))
    )
    received = {}
    for path in sorted((keep / "received").glob("*.dcm")):
        ds = dcmread(path)
        if ds.StudyInstanceUID == phantom.first.StudyInstanceUID:
            received[ds.Modality] = (path, ds)
    (seg_path, seg), (sr_path, sr) = received["SEG"], received["SR"]
    assert check_seg_references(phantom, seg).outcome == "PASS"
    assert check_seg_truth(phantom, seg_path, demo=True).outcome == "PASS"
    assert check_sr_truth(phantom, sr_path, demo=True).outcome == "PASS"

    uids = phantom.uids("series")
    moved = {uid: uids[(i + 8) % len(uids)] for i, uid in enumerate(uids)}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                source.ReferencedSOPInstanceUID = moved[source.ReferencedSOPInstanceUID]
    seg.save_as(tmp_path / "moved-seg.dcm")
    misplaced = check_seg_references(phantom, seg)
    assert misplaced.outcome == "FAIL" and "lie elsewhere" in misplaced.detail
    assert check_seg_truth(phantom, tmp_path / "moved-seg.dcm", demo=True).outcome == "FAIL"

    for item in sr.iterall():
        if item.keyword == "ReferencedSOPInstanceUID" and item.value in moved:
            item.value = moved[item.value]
    sr.save_as(tmp_path / "moved-sr.dcm")
    assert check_sr_truth(phantom, tmp_path / "moved-sr.dcm", demo=True).outcome == "FAIL"


def test_a_node_that_would_not_send_back_is_refused_with_the_yaml_to_add(
    make_node, tmp_path
) -> None:
    node: NodeProcess = make_node(assembly=FAST)  # no peers, no destinations
    done = run_qa(node.config_path, "--algorithms", "pneumonia-cxr")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"peers has no entry for {QA_AE_TITLE}" in done.stderr
    assert "no 'sender' among their destinations" in done.stderr
    assert f"  {QA_AE_TITLE}: {{host: 127.0.0.1, port: 11190}}" in done.stderr
    assert "  destinations: [sender]" in done.stderr
    assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 0  # it did not silently send
    # What it printed, added to the node's configuration, is what the node needed.
    snippet = yaml.safe_load(done.stderr.split("run qa again:", 1)[1])
    snippet["peers"][QA_AE_TITLE]["port"] = free_port()  # 11190 may be taken here
    assert node.stop() == 0
    node.settings.update(snippet)
    node.start()
    done = run_qa(node.config_path, "--algorithms", "pneumonia-cxr", "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert {result for result, _ in rows(done.stdout).values()} == {"PASS"}


def test_a_node_that_delivers_nothing_fails(make_node) -> None:
    node = make_node(assembly=FAST, peers=peers(), routing=SEND_BACK, worker={"enabled": False})
    done = run_qa(node.config_path, "--algorithms", "pneumonia-cxr", "--timeout", "5", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "FAIL"
    outcome = {(c["study"], c["name"]): c for c in report["checks"]}
    assert outcome[("node", "C-ECHO")]["outcome"] == "PASS"
    assert outcome[("pneumonia-cxr", "C-STORE")]["outcome"] == "PASS"
    arrived = outcome[("pneumonia-cxr", "results arrived")]
    assert arrived["outcome"] == "FAIL"
    # The node's own records say why: its job was never picked up.
    assert "nothing within 5 s" in arrived["detail"]
    assert "not started (is a worker running?)" in arrived["detail"]


def write_config(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "node.yaml"
    config = {
        "scp": {"host": "127.0.0.1", "port": free_port()},
        "store": {"data_dir": str(tmp_path / "data")},
        "peers": peers(),
        "routing": SEND_BACK,
    }
    config.update(sections)
    path.write_text(yaml.safe_dump(config))
    return path


def test_no_node_listening_fails_at_the_echo(tmp_path) -> None:
    done = run_qa(write_config(tmp_path), "--algorithms", "pneumonia-cxr", timeout_s=120)
    assert done.returncode == 1, done.stdout + done.stderr
    table = rows(done.stdout)
    assert table[("node", "C-ECHO")][0] == "FAIL"
    assert list(table) == [("node", "C-ECHO")]  # nothing else is tried
    assert done.stdout.rstrip().splitlines()[-1].startswith("verdict: FAIL")


def test_rules_that_would_not_route_the_phantom_or_unknown_algorithms_are_refused(
    tmp_path,
) -> None:
    rules = [
        {
            "algorithm": "pneumonia-cxr",
            "series": {"modality": ["CR"], "calling_aet": ["CR_ROOM_1"]},
        }
    ]
    config = write_config(tmp_path, routing={"rules": rules, "destinations": ["sender"]})
    done = run_qa(config, timeout_s=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pneumonia-cxr: the node's rules would not route its phantom" in done.stderr
    assert f"sent by {QA_AE_TITLE}, not an allowed calling AE" in done.stderr
    done = run_qa(config, "--algorithms", "bone-age-xr", timeout_s=120)
    assert done.returncode == 2 and "no phantom for bone-age-xr" in done.stderr
