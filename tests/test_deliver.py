"""Delivery to a real PACS: Orthanc pushes studies to the node, the node's results arrive back
in the same study (C-STORE and STOW-RS), exactly once, through an outage and a node restart;
a PACS that refuses our association gives one clear dead letter, not a loop."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import DeliveryConfig, load_config
from dicom_node.deliver import backoff_s
from dicom_node.errors import ConfigError
from dicom_node.phantoms import (
    BrainPhantomSpec,
    CtPhantomSpec,
    CxrPhantomSpec,
    cxr_dataset,
    write_brain_study,
    write_ct_series,
)
from dicom_node.testing import Orthanc, free_port, missing_orthanc
from tests.support.cases import PHANTOMS
from tests.support.node import NodeProcess, plugin_env

FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
SEG, SR, SC = (
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.7",
)
QUICK_RETRIES = {"backoff_initial_s": 0.3, "backoff_max_s": 1.0, "poll_s": 0.1}
EXAMPLE = {"algorithm": "example-threshold", "series": {"modality": ["CT"]}}


@pytest.fixture(scope="module", autouse=True)
def orthanc_ready() -> None:
    lacking = missing_orthanc()
    if lacking:
        pytest.fail(f"the delivery tests need: {', '.join(lacking)}")


def small_ct(folder: Path) -> list[Path]:
    return write_ct_series(folder, PHANTOMS["axial"])  # one the demo weights find a nodule in


def pacs(tmp_path: Path, node_port: int, **extra) -> Orthanc:
    """Orthanc with a DICOM server, the node in its modality list."""
    return Orthanc(
        tmp_path / "orthanc",
        dicom_port=free_port(),
        modalities={"node": ["DICOMNODE", "127.0.0.1", node_port]},
        extra=extra,
    )


def node_for(make_node, orthanc: Orthanc, *, rules=None, env=None, **settings) -> NodeProcess:
    """A node whose peers list Orthanc, sending results back to the sender by default."""
    settings.setdefault("routing", {})
    if rules is not None:
        settings["routing"]["rules"] = rules
    settings["routing"].setdefault("destinations", ["sender"])
    return make_node(
        assembly=FAST,
        peers={orthanc.aet: {"host": "127.0.0.1", "port": orthanc.dicom_port}},
        env=env,
        **settings,
    )


def push(orthanc: Orthanc, paths: list[Path]) -> str:
    """Upload to Orthanc and have it C-STORE the study to the node, as a PACS's routing
    would; the study's Orthanc ID."""
    for path in paths:
        orthanc.upload(path)
    study = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    (orthanc_id,) = [r["ID"] for r in orthanc.post("/tools/lookup", study) if r["Type"] == "Study"]
    orthanc.post("/modalities/node/store", {"Resources": [orthanc_id], "Synchronous": True})
    return orthanc_id


def instances_in(orthanc: Orthanc, study_id: str) -> list[dict]:
    """Every instance of the study in Orthanc, with its main tags."""
    found = []
    for series in orthanc.get(f"/studies/{study_id}/series"):
        for instance in orthanc.get(f"/series/{series['ID']}/instances"):
            tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
            found.append(tags)
    return found


def wait_results(orthanc: Orthanc, study_id: str, classes: set[str], timeout_s=240) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        results = [t for t in instances_in(orthanc, study_id) if t["SOPClassUID"] in classes]
        if {t["SOPClassUID"] for t in results} == classes:
            return results
        time.sleep(0.5)
    raise AssertionError(f"results {classes} did not arrive in the study")


def three_studies(folder: Path) -> dict[str, tuple[list[Path], set[str]]]:
    """A phantom chest CT, four-sequence brain MR and chest radiograph, and the SOP classes
    of the results each should bring back."""
    ct = small_ct(folder / "ct")
    write_brain_study(folder / "mr", BrainPhantomSpec(seed=7))
    mr = sorted(p for p in (folder / "mr").rglob("*") if p.is_file())
    cxr = folder / "cxr.dcm"
    cxr_dataset(CxrPhantomSpec(rows=400, columns=520, opacity=True)).save_as(
        cxr, enforce_file_format=True
    )
    return {"CT": (ct, {SEG, SR}), "MR": (mr, {SEG, SR}), "CXR": ([cxr], {SR, SC})}


def check_results(orthanc: Orthanc, name: str, study_id: str, sources, classes) -> None:
    """Each result once, in the source's study, in a series of its own; a SEG references
    the series it was made from."""
    results = wait_results(orthanc, study_id, classes)
    study_uid = dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    assert {r["StudyInstanceUID"] for r in results} == {study_uid}, name
    assert len(results) == len(classes), f"{name}: a result arrived twice"
    source_series = {dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in sources}
    for tags in results:
        assert tags["SeriesInstanceUID"] not in source_series, name
    for seg in (r for r in results if r["SOPClassUID"] == SEG):
        referenced = {s["SeriesInstanceUID"] for s in seg["ReferencedSeriesSequence"]}
        assert referenced and referenced <= source_series, name


@pytest.mark.integration
def test_results_arrive_back_in_the_pacs_study(make_node, tmp_path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=free_port())
    node = node_for(make_node, orthanc)
    orthanc.modalities = {"node": ["DICOMNODE", "127.0.0.1", node.port]}
    orthanc.start()
    try:
        for name, (sources, classes) in three_studies(tmp_path).items():
            check_results(orthanc, name, push(orthanc, sources), sources, classes)
        # Orthanc holds the last results a moment before the node has recorded its answer.
        done = "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'"
        assert node.wait_for(done, 3, timeout_s=30) == 3, node.log()
        sent = node.query("SELECT state, attempts, peer_aet FROM deliveries")
        assert [(r["state"], r["attempts"], r["peer_aet"]) for r in sent] == [
            ("sent", 1, "ORTHANC")
        ] * 3
        assert "deliveries: sent 3" in node.status()
    finally:
        orthanc.stop()


@pytest.mark.integration
def test_stow_rs_to_the_pacs_dicomweb(make_node, tmp_path) -> None:
    from dicom_node.scu import send

    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        node = make_node(
            assembly=FAST,
            destinations={"web": {"type": "dicomweb", "url": f"{orthanc.url}/dicom-web"}},
            routing={"destinations": ["web"]},
        )
        for name, (sources, classes) in three_studies(tmp_path).items():
            assert len(send(sources, "127.0.0.1", node.port).sent) == len(sources)
            study_uid = dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
            check_results(orthanc, name, wait_study(orthanc, study_uid), sources, classes)
        done = "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'"
        assert node.wait_for(done, 3, timeout_s=30) == 3, node.log()
        sent = node.query("SELECT destination, state, attempts FROM deliveries")
        assert [tuple(r) for r in sent] == [("web", "sent", 1)] * 3
    finally:
        orthanc.stop()


@pytest.mark.integration
def test_an_outage_and_a_restart_deliver_everything_exactly_once(make_node, tmp_path) -> None:
    from dicom_node.scu import send

    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=free_port())
    node = node_for(
        make_node,
        orthanc,
        rules=[EXAMPLE],
        env=plugin_env(),
        delivery={**QUICK_RETRIES, "max_attempts": 1000},
    )
    orthanc.modalities = {"node": ["DICOMNODE", "127.0.0.1", node.port]}
    # The PACS sent a study and went down before the results were ready.
    ct = small_ct(tmp_path / "ct")
    assert len(send(ct, "127.0.0.1", node.port, calling_aet=orthanc.aet).sent) == len(ct)
    try:
        failing = "SELECT COALESCE(MAX(attempts), 0) >= 3 FROM deliveries WHERE state = 'pending'"
        assert node.wait_for(failing, 1, timeout_s=120) == 1, node.log()
        assert node.stop() == 0  # and the node restarts while its delivery is pending
        orthanc.start()
        node.start()
        study_uid = dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
        study_id = wait_study(orthanc, study_uid)
        wait_results(orthanc, study_id, {SEG, SR})
        time.sleep(2)  # time for a duplicate, were one to come
        results = instances_in(orthanc, study_id)
        assert len(results) == 2, "a result arrived twice"
        (row,) = node.query("SELECT state, attempts, last_error FROM deliveries")
        assert row["state"] == "sent" and row["attempts"] > 3
        outputs = {r["sop_instance_uid"] for r in node.query("SELECT * FROM outputs")}
        assert {r["SOPInstanceUID"] for r in results} == outputs  # the stored objects
        assert "delivered to sender (ORTHANC)" in node.log()
    finally:
        orthanc.stop()


def wait_study(orthanc: Orthanc, study_uid: str, timeout_s: float = 120) -> str:
    """The Orthanc ID of the study once something of it arrived."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [r["ID"] for r in orthanc.post("/tools/lookup", study_uid) if r["Type"] == "Study"]
        if found:
            return found[0]
        time.sleep(0.3)
    raise AssertionError("the study never arrived in the PACS")


@pytest.mark.integration
def test_a_pacs_that_refuses_us_gives_one_dead_letter(make_node, tmp_path) -> None:
    orthanc = Orthanc(
        tmp_path / "orthanc",
        dicom_port=free_port(),
        extra={
            "DicomCheckCalledAet": True,
        },
    ).start()
    try:
        node = make_node(
            assembly=FAST,
            destinations={
                "pacs": {
                    "type": "dicom",
                    "ae_title": "NOT_ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            },
            routing={"rules": [EXAMPLE], "destinations": ["pacs"]},
            delivery=QUICK_RETRIES,
            # Nothing undelivered is ever deleted, however short the retention.
            retention={"instances_hours": 0, "results_hours": 0, "check_every_s": 0.2},
            env=plugin_env(),
        )
        from dicom_node.scu import send

        send(small_ct(tmp_path / "ct"), "127.0.0.1", node.port)
        dead = "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'"
        assert node.wait_for(dead, 1, timeout_s=120) == 1, node.log()
        time.sleep(1.5)  # several poll periods: no further attempt
        (row,) = node.query("SELECT job_id, attempts, last_error FROM deliveries")
        assert row["attempts"] == 1
        assert "rejected the association" in row["last_error"]
        assert node.log().count("dead letter") == 1
        assert node.query("SELECT COUNT(*) FROM purges")[0][0] == 0
        jobs = subprocess.run(
            [sys.executable, "-m", "dicom_node", "jobs", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "dead" in jobs and "rejected the association" in jobs
        retry = node.cli("jobs", "retry", str(row["job_id"]))
        assert retry.returncode == 0 and "1 delivery queued again" in retry.stdout
        assert node.wait_for("SELECT attempts FROM deliveries", 1, timeout_s=30) == 1
        assert node.wait_for(dead, 1, timeout_s=30) == 1
    finally:
        orthanc.stop()


@pytest.mark.unit
def test_sender_peer_not_configured_is_a_clear_dead_letter() -> None:
    from dicom_node.deliver import resolve
    from dicom_node.errors import DeliveryError
    from dicom_node.jobs import Delivery, DeliveryState

    config = load_config(None, environ={})
    delivery = Delivery(1, 1, "sender", "MODALITY1", DeliveryState.PENDING, 0, 0.0, None, 0.0, None)
    with pytest.raises(DeliveryError, match=r"MODALITY1.*not under 'peers'") as raised:
        resolve(config, delivery)
    assert raised.value.permanent


@pytest.mark.unit
def test_backoff_doubles_up_to_the_maximum_with_jitter() -> None:
    config = DeliveryConfig(backoff_initial_s=5, backoff_max_s=60, backoff_jitter=0.2)
    rng = random.Random(0)
    waits = [[backoff_s(n, config, rng) for _ in range(200)] for n in (1, 2, 3, 4, 5, 9)]
    for wait, base in zip(waits, (5, 10, 20, 40, 60, 60), strict=True):
        assert base * 0.8 <= min(wait) and max(wait) <= base * 1.2
        assert max(wait) - min(wait) > base * 0.2  # spread, so retries do not move in step


@pytest.mark.unit
def test_routes_name_only_configured_destinations() -> None:
    with pytest.raises(ConfigError, match=r"routing.destinations: no destination named 'pacs'"):
        load_config(None, environ={"DICOM_NODE__ROUTING__DESTINATIONS": "[pacs]"})
    config = load_config(None, environ={"DICOM_NODE__ROUTING__DESTINATIONS": "[sender]"})
    assert config.routing.destinations == ["sender"]


@pytest.mark.integration
def test_folder_destination_and_retention(make_node, tmp_path) -> None:
    """Results land complete in a folder; then the received instances and the result files
    are deleted once delivered and their time is up, while the index keeps the record."""
    from dicom_node.scu import send

    outbox = tmp_path / "outbox"
    node = make_node(
        assembly=FAST,
        destinations={"share": {"type": "folder", "path": str(outbox)}},
        routing={"rules": [EXAMPLE], "destinations": ["share"]},
        retention={"instances_hours": 0, "results_hours": 0, "check_every_s": 0.2},
        env=plugin_env(),
    )
    ct = small_ct(tmp_path / "ct")
    assert len(send(ct, "127.0.0.1", node.port).sent) == len(ct)
    assert node.wait_for("SELECT COUNT(*) FROM purges", 2, timeout_s=120) == 2, node.log()
    delivered = sorted(outbox.rglob("*.dcm"))
    assert len(delivered) == 2 and not list(outbox.rglob("*.partial"))
    study_uid = dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    assert {dcmread(p).StudyInstanceUID for p in delivered} == {study_uid}
    stored = node.query("SELECT path FROM instances")
    assert len(stored) == len(ct)  # the record stays
    assert not any((node.data_dir / r["path"]).exists() for r in stored)  # the data goes
    assert not (node.data_dir / "results").exists() or not any(
        (node.data_dir / "results").rglob("*.dcm")
    )
    purges = {r["subject"].split(":")[0]: r["files"] for r in node.query("SELECT * FROM purges")}
    assert purges == {"study": len(ct), "job": purges["job"]} and purges["job"] >= 2


@pytest.mark.integration
def test_a_c_store_left_without_response_is_sent_again_on_a_new_association(tmp_path) -> None:
    """A C-STORE whose response never comes (a peer that stalls, or pynetdicom's requestor
    losing a fast response to its reactor thread, pynetdicom issue 875) is tried once more on
    a new association; the peer then has every instance, the first one twice."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from dicom_node.scu import send

    files = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=3, rows=16, columns=16))
    got: list[str] = []
    stall = threading.Event()

    def on_store(event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        got.append(uid)
        if len(got) == 1:
            stall.wait(10)  # past the sender's DIMSE timeout: it gives up on this response
        return 0x0000

    scp = AE(ae_title="STALLING")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        report = send(files, "127.0.0.1", port, called_aet="STALLING", timeout_s=2)
    finally:
        stall.set()
        server.shutdown()
    assert sorted(report.sent) == sorted(files) and not report.failed
    first = str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    assert got.count(first) == 2 and len(got) == 4
