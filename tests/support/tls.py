"""A throwaway PKI made with openssl, the node's TLS settings and a C-ECHO over TLS (PS3.15
B.1)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.node import NodeProcess


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Path:
    """A CA and the node's and a client's certificates signed by it, in ``d``."""
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
    """The node's TLS settings (``scp.tls`` or ``http.tls``): its certificate, client
    certificates required from our CA."""
    return {
        "enabled": True,
        "cert_file": str(pki / "node.crt"),
        "key_file": str(pki / "node.key"),
        "ca_file": str(pki / "ca.crt"),
        "require_client_cert": True,
    }


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client's TLS context trusting ``ca`` for the node, showing ``cert`` (None: none)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def tls_echo(node: NodeProcess, ca: Path, cert: Path | None, key: Path | None) -> bool:
    """C-ECHO over TLS, trusting ``ca`` for the node, showing ``cert`` (None: no certificate).
    Bounded in time: a client that waits forever for a handshake would hang the test."""
    context = client_context(ca, cert, key)
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
