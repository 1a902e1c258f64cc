"""DICOM over TLS (PS3.15 B.1) with client certificates, using pynetdicom's ssl support."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from tests.support.http import metrics
from tests.support.tls import client_context, tls_echo, tls_scp

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


def test_instances_stored_over_tls_take_the_fast_path(make_node, pki: Path, tmp_path: Path) -> None:
    """The fast path reads the TLS socket pynetdicom handed over: stored byte for byte."""
    node = make_node(scp={"tls": tls_scp(pki)}, worker={"enabled": False})
    files = write_ct_series(tmp_path / "ct", CtPhantomSpec(slices=4, rows=256, columns=256))
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    context = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", tls_args=(context, None))
    assert assoc.is_established
    try:
        # A path is sent as the file holds it (pynetdicom streams it, no re-encoding).
        assert [int(assoc.send_c_store(path).Status) for path in files] == [0] * len(files)
    finally:
        assoc.release()
    node.assert_kept(files, byte_identical=True)
    fast = metrics(node.http_url)[("dicom_node_instances_received_fast_path_total", ())]
    assert fast == len(files)


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
