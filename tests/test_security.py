"""Security properties of a running node, over real connections on loopback.

Already proven elsewhere, and not repeated here:

- tests/test_tls.py: with ``scp.tls.require_client_cert`` a client with a certificate from
  our CA is served, one without a certificate and a plain-TCP client are refused; results are
  delivered over TLS with our client certificate.
- tests/test_association_policy.py: the calling-AE allow-list admits listed AEs only and
  refuses a listed AE bound to another host; a wrong called AE is rejected.
- tests/test_web.py: the bearer token on loopback (401 without, with a wrong one, 200 with it;
  a text/plain POST refused) and the configuration refusing a host beyond loopback without one.

Here: a certificate from another CA; dcmtk as a TLS peer; a TLS client that connects and
stays silent; an allow-list entry bound to an address, from that address and from another;
the token on a service bound beyond loopback and the exit status without one; and no patient
data in the node's log while studies go through everything a node does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

import dicom_node.scu  # noqa: F401  (files are sent as stored: the request's UIDs come from the meta)
from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.testing import dcmtk_env, free_port
from tests.support.audit import event_type, read_trail
from tests.support.node import NodeProcess, closed_by_node, plugin_env
from tests.support.peers import require_tool
from tests.support.tls import openssl, tls_echo, tls_scp

pytestmark = pytest.mark.integration

TOKEN = "a-token-long-enough-for-the-node"
ACSE_TIMEOUT_S = 3.0


# -- TLS with client certificates -------------------------------------------------------------


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, and a client certificate it signed with the same name as ours."""
    d = tmp_path_factory.mktemp("rogue")
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=rogue CA"),
        cwd=d,
    )
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key"),
        *("-out", "client.csr", "-subj", "/CN=client"),
        cwd=d,
    )
    openssl(
        *("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", "client.crt", "-days", "2"),
        cwd=d,
    )
    return d


@pytest.fixture
def tls_node(make_node, pki: Path) -> NodeProcess:
    return make_node(scp={"tls": tls_scp(pki), "acse_timeout_s": ACSE_TIMEOUT_S})


def test_a_client_certificate_from_another_ca_is_refused(
    tls_node: NodeProcess,
    pki: Path,
    rogue: Path,
) -> None:
    assert not tls_echo(tls_node, pki / "ca.crt", rogue / "client.crt", rogue / "client.key")
    assert "TLS handshake with 127.0.0.1 failed" in tls_node.log()
    assert "TLSCLIENT" not in tls_node.log()  # no association got as far as its AE title
    assert tls_echo(tls_node, pki / "ca.crt", pki / "client.crt", pki / "client.key")
    # Audited as a failed node authentication, the peer named by its address (PS3.15 A.5.3.12).
    trail = read_trail(tls_node.data_dir / "audit" / "audit.jsonl")
    refused = [
        m
        for m in trail
        if event_type(m) == "Node Authentication"
        and "TLS handshake failed" in m["EventIdentification"].get("EventOutcomeDescription", "")
    ]
    assert refused, [event_type(m) for m in trail]
    assert refused[0]["EventIdentification"]["EventOutcomeIndicator"] == 4
    peer = refused[0]["ActiveParticipant"][0]
    assert (peer["UserID"], peer["NetworkAccessPointID"]) == ("127.0.0.1", "127.0.0.1")
    assert "AlternativeUserID" not in peer


def dcmtk_tls_echo(
    node: NodeProcess, ca: Path, cert: Path, key: Path
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            require_tool("echoscu"),
            *("-aet", "DCMTKTLS", "-aec", "DICOMNODE"),
            *("+tls", str(key), str(cert), "+cf", str(ca)),
            *("-to", "10", "-ta", "10", "-td", "10"),
            "127.0.0.1",
            str(node.port),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dcmtk_is_served_with_our_certificate_and_refused_with_another(
    tls_node: NodeProcess,
    pki: Path,
    rogue: Path,
) -> None:
    """Interoperability with another TLS stack (OpenSSL under dcmtk), both ways."""
    ours = dcmtk_tls_echo(tls_node, pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assert ours.returncode == 0, ours.stdout + ours.stderr
    theirs = dcmtk_tls_echo(tls_node, pki / "ca.crt", rogue / "client.crt", rogue / "client.key")
    assert theirs.returncode != 0
    log = tls_node.log()
    assert log.count("association from DCMTKTLS at 127.0.0.1 accepted") == 1
    assert "TLS handshake with 127.0.0.1 failed" in log


def test_a_silent_tls_client_does_not_keep_others_out(
    tls_node: NodeProcess,
    pki: Path,
) -> None:
    """A peer that opens a connection and never starts the handshake is served no worse than
    a silent plain-TCP peer: it waits out the ACSE timeout alone, others are served meanwhile."""
    with socket.create_connection(("127.0.0.1", tls_node.port)) as silent:
        started = time.monotonic()
        assert tls_echo(tls_node, pki / "ca.crt", pki / "client.crt", pki / "client.key")
        assert time.monotonic() - started < ACSE_TIMEOUT_S, "served only after the silent one"
        assert closed_by_node(silent, ACSE_TIMEOUT_S + 5)
    assert (
        "TLS handshake with 127.0.0.1 failed: no handshake within scp.acse_timeout_s"
        in tls_node.log()
    )
    assert tls_echo(tls_node, pki / "ca.crt", pki / "client.crt", pki / "client.key")


# -- the calling-AE allow-list bound to an address ------------------------------------------------


def small_ct() -> Dataset:
    return next(ct_series(CtPhantomSpec(slices=1, rows=16, columns=16)))


def associate_from(node: NodeProcess, address: str, ds: Dataset) -> tuple[str, object]:
    """MODALITY connecting from ``address``: ("stored", C-STORE status) when admitted, else
    ("rejected", (result, source, reason)) from the A-ASSOCIATE-RJ."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", bind_address=(address, 0))
    if not assoc.is_established:
        assert assoc.is_rejected, "neither admitted nor rejected"
        rj = assoc.acceptor.primitive
        return "rejected", (rj.result, rj.result_source, rj.diagnostic)
    try:
        return "stored", int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_an_allow_list_entry_bound_to_an_address_admits_that_address_only(make_node) -> None:
    node = make_node(scp={"allowed_calling_aets": ["MODALITY@127.0.0.2"]})
    refused, allowed = small_ct(), small_ct()
    # PS3.8 Table 9-21: rejected-permanent, service-user, calling-AE-title-not-recognized.
    assert associate_from(node, "127.0.0.1", refused) == ("rejected", (1, 1, 3))
    assert associate_from(node, "127.0.0.2", allowed) == ("stored", 0)
    rows = node.query("SELECT sop_instance_uid, peer_host FROM instances")
    assert [(r[0], r[1]) for r in rows] == [(allowed.SOPInstanceUID, "127.0.0.2")]
    log = node.log()
    assert "rejected association from calling AE 'MODALITY' at 127.0.0.1" in log
    assert "association from MODALITY at 127.0.0.2 accepted" in log


# -- the HTTP token beyond loopback ----------------------------------------------------------


def http_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_token_guards_a_service_bound_beyond_loopback(make_node) -> None:
    node = make_node(http={"host": "127.0.0.2", "port": free_port(), "token": TOKEN})
    url = f"http://127.0.0.2:{node.http_port}"
    assert http_status(url + "/healthz") == 200  # probes need no token
    for path in ("/api/studies", "/api/jobs", "/metrics"):
        assert http_status(url + path) == 401
        assert http_status(url + path, token=TOKEN[::-1]) == 401
        assert http_status(url + path, token=TOKEN) == 200
    with pytest.raises(urllib.error.URLError):  # bound to 127.0.0.2 only
        urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=5)


@pytest.mark.parametrize(
    ("config", "environ"),
    [
        ({"http": {"host": "127.0.0.2"}}, {}),
        ({}, {"DICOM_NODE__HTTP__HOST": "0.0.0.0"}),
    ],
    ids=["file", "environment"],
)
def test_without_a_token_beyond_loopback_the_node_refuses_to_start(
    tmp_path: Path, config: dict, environ: dict[str, str]
) -> None:
    import yaml

    scp_port = free_port()
    path = tmp_path / "node.yaml"
    settings = {
        "scp": {"host": "127.0.0.1", "port": scp_port},
        "store": {"data_dir": str(tmp_path / "data")},
    }
    for section, values in config.items():
        settings.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE__")}
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
        env={**env, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "configuration error" in result.stderr and "http.token" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything
    with socket.socket() as probe:  # and never listened
        assert probe.connect_ex(("127.0.0.1", scp_port)) != 0


# -- no patient data in the log ------------------------------------------------------------------

# Distinctive, so that any appearance in a log is ours: each part is searched on its own.
PATIENT = {
    "PatientName": "Zorblaxine^Quiventhal",
    "PatientID": "PID4471XQZ",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACC9930127",
    "InstitutionName": "Wimbletrode Memorial",
}
NEEDLES = ("Zorblaxine", "Quiventhal", "PID4471XQZ", "19230417", "1923-04-17", "ACC9930127")
NEEDLES += ("Wimbletrode",)
FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
QUICK_RETRIES = {"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "poll_s": 0.1, "max_attempts": 2}


def with_patient(ds: Dataset) -> Dataset:
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    return ds


def store_all(node: NodeProcess, datasets: list[Dataset] | list[Path]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_no_patient_data_in_the_log_at_info(make_node, tmp_path: Path) -> None:
    """Receive, route, infer, write, deliver (one destination that takes the results, one that
    is down, one that rejects us, and the sender, which is unknown), refuse instances: the
    node's log, and the receiving node's, hold none of the patient's data. The audit trail
    may, and does."""
    archive = make_node("archive", scp={"ae_title": "ARCHIVE"}, worker={"enabled": False})
    node = make_node(
        "node",
        env=plugin_env(),
        logging={"level": "INFO"},
        assembly=FAST,
        routing={
            "rules": [{"algorithm": "example-threshold", "series": {"modality": ["CT"]}}],
            "destinations": ["archive", "down", "wrong-ae", "sender"],
        },
        destinations={
            "archive": {
                "type": "dicom",
                "ae_title": "ARCHIVE",
                "host": "127.0.0.1",
                "port": archive.port,
            },
            "down": {
                "type": "dicom",
                "ae_title": "ARCHIVE",
                "host": "127.0.0.1",
                "port": free_port(),
            },
            "wrong-ae": {
                "type": "dicom",
                "ae_title": "NOT-ARCHIVE",
                "host": "127.0.0.1",
                "port": archive.port,
            },
        },
        delivery=QUICK_RETRIES,
        worker={"max_attempts": 1},
    )
    # Two studies of the patient: one as the standard says, one as a sloppy modality writes
    # it (a birth date with dashes, a sex in words, a name without its carets): pydicom
    # quotes invalid values it reads, highdicom quotes a name it doubts.
    spec = CtPhantomSpec(slices=8, rows=32, columns=32)
    series = [with_patient(ds) for ds in ct_series(spec)]
    sloppy = [with_patient(ds) for ds in ct_series(spec)]
    refused = [
        with_patient(small_ct()),  # SOP Instance UID not a UID: 0xC000
        with_patient(small_ct()),  # not the instance the request names: 0xA900
    ]
    with warnings.catch_warnings():  # the invalid values are the point
        warnings.filterwarnings("ignore", "Invalid value for VR", UserWarning)
        for ds in sloppy:
            ds.PatientBirthDate, ds.PatientSex = "1923-04-17", "Female"
            ds.PatientName = "Zorblaxine Quiventhal"
        refused[0].SOPInstanceUID = "1.2.3.x"
    refused[1].file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert store_all(node, series) == [0] * len(series)
    assert store_all(node, sloppy) == [0] * len(sloppy)
    assert [store_file(node, ds, tmp_path) for ds in refused] == [0xC000, 0xA900]

    ended = (
        "SELECT COUNT(*) FROM jobs WHERE kind = 'inference' AND state IN ('succeeded', 'failed')"
    )
    assert node.wait_for(ended, 2, timeout_s=120) == 2, node.log()
    pending = "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'"
    assert node.wait_for(pending, 0, timeout_s=60) == 0, node.log()
    # Both studies went everywhere a result goes: the sloppy one's results carry its invalid
    # date and sex empty (Type 2), not a failed job.
    jobs = {
        json.loads(row["payload"])["inputs"]["series"]: row
        for row in node.query("SELECT id, state, payload FROM jobs WHERE kind = 'inference'")
    }
    for study in (series, sloppy):
        job = jobs[study[0].SeriesInstanceUID]
        assert job["state"] == "succeeded"
        states = node.query(
            "SELECT destination, state FROM deliveries WHERE job_id = ?", (job["id"],)
        )
        expected = {"archive": "sent", "down": "dead", "wrong-ae": "dead", "sender": "dead"}
        assert dict(states) == expected
        outputs = node.query("SELECT sop_instance_uid FROM outputs WHERE job_id = ?", (job["id"],))
        marks = ",".join("?" * len(outputs))
        sent = archive.query(
            f"SELECT path FROM instances WHERE sop_instance_uid IN ({marks})",
            tuple(row[0] for row in outputs),
        )
        assert len(sent) == len(outputs) == 2  # a SEG and an SR
    for (path,) in sent:  # the sloppy study's
        result = dcmread(archive.data_dir / path)
        assert (result.PatientBirthDate, result.PatientSex) == ("", "")
        assert result.PatientName == "Zorblaxine Quiventhal"

    for who in (node, archive):
        log = who.log()
        leaked = [n for n in NEEDLES if n.lower() in log.lower()]
        assert not leaked, f"{who.workdir.name}'s log holds {leaked}"
    audit = (node.data_dir / "audit" / "audit.jsonl").read_text()
    assert "PID4471XQZ" in audit  # the audit trail is where the patient is named, on purpose
    assert json.loads(audit.splitlines()[0])  # and it is JSON lines


def store_file(node: NodeProcess, ds: Dataset, folder: Path) -> int:
    """C-STORE ``ds`` as a Part-10 file sent as it is: the request names what its file meta
    says, whatever the data set holds."""
    path = folder / f"{generate_uid()}.dcm"
    ds.preamble = b"\0" * 128
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)
        ds.save_as(path)  # without enforce_file_format pydicom keeps the meta as it is
    (status,) = store_all(node, [path])
    return status
