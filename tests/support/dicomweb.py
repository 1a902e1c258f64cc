"""Reading a node's DICOMweb origin server (dicom_node/dicomweb.py) in tests: the client the
tests use (dicomweb-client with the node's token), raw requests for what a client library
hides (status codes, media types, bytes), and corpus files given UIDs of their own so that
the corpus's several encodings of one instance can all be stored on one node."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.node import NodeProcess, wait_until
from tests.support.paths import CORPUS


def wait_for_seg_and_sr(node: NodeProcess) -> None:
    """Wait until the node has written the lung-nodule detector's SEG and SR of a CT it received."""
    wait_until(
        lambda: {r[0] for r in node.query("SELECT kind FROM outputs")} >= {"SEG", "SR"},
        timeout_s=300,
        what="the lung-nodule detector's SEG and SR",
        log=node.log(),
    )


def client(node: NodeProcess, token: str | None) -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(url=f"{node.http_url}/dicom-web", headers=headers)


def get(
    node: NodeProcess, path: str, *, token: str | None, accept: str | None = None
) -> requests.Response:
    """GET ``/dicom-web{path}`` as it is, nothing retried or parsed."""
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if accept is not None:
        headers["Accept"] = accept
    return requests.get(f"{node.http_url}/dicom-web{path}", headers=headers, timeout=120)


def parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related response: each one's Content-Type and bytes."""
    return split_multipart(response.headers["Content-Type"], response.content)


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related body of ``content_type``."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    assert message.is_multipart(), content_type
    found = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((str(part["Content-Type"]), payload))
    return found


# Real-world encodings from the shared corpus: one CT slice in many transfer syntaxes (native
# implicit and explicit, big endian, deflate, JPEG, JPEG-LS, JPEG 2000, RLE), one MR in nine,
# and enhanced (multi-frame) MR from two vendors.
CORPUS_FILES = (
    *sorted((CORPUS / "transfer-syntaxes-cornerstone" / "testImages").glob("CTImage.dcm_*.dcm")),
    CORPUS / "transfer-syntaxes-cornerstone" / "testImages" / "US-YBR_FULL_422-EVRLE.dcm",
    *sorted((CORPUS / "transfer-syntaxes-mr-dcm_qa_ts" / "In").glob("*.dcm")),
    CORPUS / "enhanced-mr-dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_1.dcm",
    CORPUS / "enhanced-mr-dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm",
)


def corpus_copies(folder: Path) -> dict[str, Path]:
    """Each corpus file with new study, series and instance UIDs (its encoding, pixel data
    included, as it was); by the source's name. Files pydicom cannot write back are left out."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for index, source in enumerate(CORPUS_FILES):
        if not source.is_file():
            continue
        ds = dcmread(source)
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"DICOMWEB-{index:02d}"
        name = f"{source.parent.name}/{source.name}"
        target = folder / f"{index:02d}.dcm"
        try:
            ds.save_as(target, enforce_file_format=True)
        except (ValueError, NotImplementedError):
            continue
        copies[name] = target
    return copies
