"""DICOM over TLS (PS3.15 B.1) with client certificates, using pynetdicom's ssl support."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.tls import tls_echo, tls_scp

pytestmark = pytest.mark.integration


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
    from tests.support.cases import PHANTOMS
    from tests.support.node import plugin_env

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
