"""DICOM over TLS (PS3.15 B.1) with client certificates, using pynetdicom's ssl support."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import NodeProcess


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        cwd=d,
    )
    for name in ("node", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            cwd=d,
        )
    return d


def tls_scp(pki: Path) -> dict:
    """The node's TLS settings: its certificate, client certificates required from our CA."""
    return {
        "enabled": True,
        "cert_file": str(pki / "node.crt"),
        "key_file": str(pki / "node.key"),
        "ca_file": str(pki / "ca.crt"),
        "require_client_cert": True,
    }


def tls_echo(node: NodeProcess, ca: Path, cert: Path | None, key: Path | None) -> bool:
    """C-ECHO over TLS, trusting ``ca`` for the node, showing ``cert`` (None: no certificate).
    Bounded in time: a client that waits forever for a handshake would hang the test."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", tls_args=(context, None))
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().get("Status", -1)) == 0
    finally:
        assoc.release()


def test_tls_with_client_certificates(make_node, pki: Path) -> None:
    node = make_node(scp={"tls": tls_scp(pki)})
    assert "(TLS)" in node.log()
    assert tls_echo(node, pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assert not tls_echo(node, pki / "ca.crt", None, None)
    plain = AE(ae_title="PLAIN")
    plain.add_requested_context(Verification)
    plain.acse_timeout = plain.network_timeout = 5
    assoc = plain.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert not assoc.is_established
    # The node keeps serving after refusing both.
    assert tls_echo(node, pki / "ca.crt", pki / "client.crt", pki / "client.key")


def test_results_are_delivered_over_tls(make_node, pki: Path, tmp_path: Path) -> None:
    """A destination that speaks TLS: verified by our CA, shown our client certificate."""
    from dicom_node.phantoms import write_ct_series
    from dicom_node.scu import send
    from tests.test_algorithms import plugin_env
    from tests.test_lung_nodules_ct import PHANTOMS

    receiver = make_node("receiver", scp={"tls": tls_scp(pki)})
    tls = {
        "ca_file": str(pki / "ca.crt"),
        "cert_file": str(pki / "client.crt"),
        "key_file": str(pki / "client.key"),
        "server_hostname": "node",  # the name in the receiver's certificate
    }
    sender = make_node(
        "sender",
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        destinations={
            "secure": {
                "type": "dicom",
                "ae_title": "DICOMNODE",
                "host": "127.0.0.1",
                "port": receiver.port,
                "tls": tls,
            }
        },
        routing={
            "rules": [{"algorithm": "example-threshold", "series": {"modality": ["CT"]}}],
            "destinations": ["secure"],
        },
        env=plugin_env(),
    )
    ct = write_ct_series(tmp_path / "ct", PHANTOMS["axial"])
    assert len(send(ct, "127.0.0.1", sender.port).sent) == len(ct)
    sent = "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'"
    assert sender.wait_for(sent, 1, timeout_s=120) == 1, sender.log()
    arrived = receiver.query("SELECT sop_class_uid FROM instances WHERE calling_aet = 'DICOMNODE'")
    assert sorted(r[0] for r in arrived) == [
        "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.88.34",
    ]
