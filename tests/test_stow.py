"""STOW-RS in (PS3.18 10.5): instances posted over HTTP are kept with C-STORE's guarantees,
complete and route as an association's would, and what cannot be stored is listed with its
reason; real clients (dicomweb-client, Orthanc's DICOMweb plugin) push to a real node."""

from __future__ import annotations

import itertools
import json
import random
import socket
import ssl
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import generate_uid

from dicom_node.errors import InvalidInstance, StowRequestError
from dicom_node.phantoms import CtPhantomSpec, write_ct_series
from dicom_node.stow import MultipartReader, chunked_reader, length_reader, parse_file_meta
from dicom_node.testing import Orthanc, missing_orthanc
from tests.support.audit import event_id, read_trail
from tests.support.dicomfiles import corpus_instances, dataset_bytes
from tests.support.node import NodeProcess, wait_until
from tests.support.paths import CORPUS
from tests.support.realworld import public_files
from tests.support.tls import client_context, tls_scp

FAST = {"series_quiet_seconds": 30, "study_quiet_seconds": 30}  # completion by request end
TOKEN = "a-stow-token-of-some-length"


def multipart(parts: list[bytes], boundary: str = "b0undary", *, headers: bool = True) -> bytes:
    """A multipart/related body as PS3.18 8.6.1.2 lays it out."""
    head = b"Content-Type: application/dicom\r\n\r\n" if headers else b"\r\n"
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + p + b"\r\n" for p in parts)
    return body + b"--" + boundary.encode() + b"--"


def content_type(boundary: str = "b0undary") -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def series(folder: Path, slices: int = 6, study_uid: str | None = None) -> list[Path]:
    spec = CtPhantomSpec(
        slices=slices,
        rows=32,
        columns=32,
        pixel_spacing_mm=(5.0, 5.0),
        slice_thickness_mm=5.0,
        study_uid=study_uid or generate_uid(),
    )
    return write_ct_series(folder, spec)


# -- the parts of a request, over many shapes (unit) -------------------------------------------


def _pieces(stream: BytesIO, sizes: list[int]):
    """A read(n) that returns at most the next of ``sizes`` bytes each call, as a socket may."""
    cycle = itertools.cycle(sizes)

    def read(n: int) -> bytes:
        return stream.read(min(n, next(cycle)))

    return read


@pytest.mark.unit
@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(
        st.one_of(
            st.binary(max_size=600),
            # Content that looks like the start of a delimiter (RFC 2046 5.1.1: never a whole
            # one; the sender picks a boundary its content does not hold).
            st.sampled_from([b"\r\n--b0undar", b"--b0undary", b"\r\n-b0undary", b"\r\n\r\n"]),
        ),
        min_size=1,
        max_size=6,
    ).filter(lambda parts: not any(b"\r\n--b0undary" in p for p in parts)),
    sizes=st.lists(st.integers(1, 97), min_size=1, max_size=5),
    with_headers=st.booleans(),
    chunked=st.booleans(),
)
def test_multipart_parts_come_back_as_sent(parts, sizes, with_headers, chunked) -> None:
    body = b"a preamble to ignore\r\n" + multipart(parts, headers=with_headers)
    if chunked:
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _split(body, 37))
        stream = BytesIO(encoded + b"0\r\n\r\n")
        read = chunked_reader(_pieces(stream, sizes), stream.readline)
    else:
        read = length_reader(_pieces(BytesIO(body), sizes), len(body))
    got = []
    for part in MultipartReader(read, "b0undary").parts():
        content = b""
        while piece := part.read():
            content += piece
        got.append(content)
    assert got == parts


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


@pytest.mark.unit
def test_a_body_that_ends_early_is_a_broken_request() -> None:
    body = multipart([b"x" * 1000])
    cut = body[:500]
    with pytest.raises(StowRequestError) as raised:
        for part in MultipartReader(
            length_reader(BytesIO(cut).read, len(body)), "b0undary"
        ).parts():
            part.drain()
    assert raised.value.status == 400


@pytest.mark.unit
def test_file_meta_of_every_corpus_file_as_pydicom_reads_it() -> None:
    """Over every real-world file of the corpus: the meta parsed from its first bytes, fed a
    few bytes at a time, says what pydicom says, and the data set starts where pydicom's
    reading of the meta ended."""
    checked = 0
    for paths in corpus_instances(CORPUS).values():
        for path in paths:
            with path.open("rb") as f:
                try:
                    read_preamble(f, force=False)
                except Exception:
                    continue  # no preamble: not a PS3.10 file as STOW-RS carries them
                expected = _read_file_meta_info(f)
                offset = f.tell()
            data = path.read_bytes()[: offset + 64]
            meta = None
            for end in range(0, len(data) + 1, 29):
                meta = parse_file_meta(data[:end])
                if meta is not None:
                    break
            meta = meta or parse_file_meta(data)
            assert meta is not None, path
            assert meta.transfer_syntax == expected.TransferSyntaxUID, path
            assert meta.sop_instance_uid == expected.MediaStorageSOPInstanceUID, path
            assert meta.sop_class_uid == expected.MediaStorageSOPClassUID, path
            assert meta.dataset_offset == offset, path
            checked += 1
    assert checked > 50


@pytest.mark.unit
@pytest.mark.parametrize(
    "data",
    [
        b"\0" * 128 + b"DIC?" + b"\0" * 20,
        b"\0" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\x04\x001.2\0",
    ],
    ids=["no DICM", "no meta group"],
)
def test_what_is_not_a_part10_file_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(InvalidInstance):
        parse_file_meta(data)


# -- a real node (integration) -----------------------------------------------------------------


def node_with(tmp_path: Path, **settings: dict) -> NodeProcess:
    settings.setdefault("assembly", FAST)
    (tmp_path / "node").mkdir()
    return NodeProcess(tmp_path / "node", settings).start()


def post(node: NodeProcess, body: bytes, path: str = "/dicom-web/studies", **headers: str):
    return requests.post(
        node.http_url + path,
        data=body,
        headers={"Content-Type": content_type(), "Accept": "application/dicom+json", **headers},
        timeout=60,
    )


def _sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sequence(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


@pytest.mark.integration
def test_dicomweb_client_stores_a_series_kept_byte_for_byte_and_completed_at_once(
    tmp_path: Path,
) -> None:
    node = node_with(tmp_path)
    try:
        files = series(tmp_path / "ct")
        client = DICOMwebClient(url=node.http_url + "/dicom-web")
        response = client.store_instances([dcmread(p) for p in files])
        referenced = response.ReferencedSOPSequence
        assert {str(i.ReferencedSOPInstanceUID) for i in referenced} == {
            str(dcmread(p).SOPInstanceUID) for p in files
        }
        assert "FailedSOPSequence" not in response
        # Listed as stored = kept: indexed and on disk, the data set byte for byte.
        node.assert_kept(files, byte_identical=True)
        # The request ended like a released association: the series completes at once, not
        # after the 30 s quiet time.
        wait_until(lambda: "by association released" in node.log(), 10, "completion", node.log())
        (row,) = node.query("SELECT DISTINCT calling_aet, peer_host FROM instances")
        assert tuple(row) == ("DICOMWEB", "127.0.0.1")
        assert not list((node.data_dir / "tmp").iterdir())
    finally:
        node.stop()


@pytest.mark.integration
def test_completion_can_be_left_to_the_quiet_time_for_clients_posting_each_instance(
    tmp_path: Path,
) -> None:
    node = node_with(
        tmp_path,
        assembly={"series_quiet_seconds": 2, "study_quiet_seconds": 2},
        dicomweb={"complete_on_request_end": False},
    )
    try:
        files = series(tmp_path / "ct", 4)
        for path in files:
            assert post(node, multipart([path.read_bytes()])).status_code == 200
        wait_until(lambda: "by quiet timer" in node.log(), 20, "completion", node.log())
        assert "by association released" not in node.log()
        assert node.query("SELECT completions FROM series")[0][0] == 1
    finally:
        node.stop()


@pytest.mark.integration
def test_per_instance_failures_are_listed_and_the_rest_stored(tmp_path: Path) -> None:
    node = node_with(tmp_path)
    try:
        study_uid = generate_uid()
        ours = series(tmp_path / "ours", 3, study_uid)
        other = series(tmp_path / "other", 2)
        unknown_class = dcmread(ours[0])
        unknown_class.SOPClassUID = unknown_class.file_meta.MediaStorageSOPClassUID = (
            "1.2.3.4.5.6.7.8"
        )
        unknown_class.SOPInstanceUID = unknown_class.file_meta.MediaStorageSOPInstanceUID = (
            generate_uid()
        )
        buffer = BytesIO()
        unknown_class.save_as(buffer, enforce_file_format=True)
        parts = [p.read_bytes() for p in ours + other] + [buffer.getvalue(), b"not DICOM at all"]
        response = post(node, multipart(parts), f"/dicom-web/studies/{study_uid}")
        assert response.status_code == 202, response.text
        assert response.headers["Content-Type"] == "application/dicom+json"
        body = response.json()
        failed = {
            (item.get("00081155", {}).get("Value", [""])[0], item["00081197"]["Value"][0])
            for item in sequence(body, "00081198")
        }
        assert failed == {
            *((str(dcmread(p).SOPInstanceUID), 0xA900) for p in other),  # another study
            (str(unknown_class.SOPInstanceUID), 0x0122),  # a SOP class not accepted
            ("", 0xC000),  # not a PS3.10 file
        }
        stored = sequence(body, "00081199")
        assert [i["00081155"]["Value"][0] for i in stored] == [
            str(dcmread(p).SOPInstanceUID) for p in ours
        ]
        assert stored[0]["00081190"]["Value"][0].startswith(
            f"{node.http_url}/dicom-web/studies/{study_uid}/series/"
        )
        assert body["00081190"]["Value"] == [f"{node.http_url}/dicom-web/studies/{study_uid}"]
        node.assert_kept(ours, byte_identical=True)
        assert node.query("SELECT COUNT(*) FROM instances")[0][0] == len(ours)
        # Nothing stored: 409 (PS3.18 10.5.3).
        response = post(
            node, multipart([p.read_bytes() for p in other]), f"/dicom-web/studies/{study_uid}"
        )
        assert response.status_code == 409
        assert not list((node.data_dir / "tmp").iterdir())
    finally:
        node.stop()


@pytest.mark.integration
def test_requests_that_cannot_be_read_are_refused_and_keep_what_came_whole(tmp_path: Path) -> None:
    node = node_with(tmp_path)
    try:
        files = series(tmp_path / "ct", 3)
        assert post(node, b"{}", **{"Content-Type": "application/json"}).status_code == 415
        wrong_type = 'multipart/related; type="application/dicom+json"; boundary=b0undary'
        assert post(node, multipart([b"{}"]), **{"Content-Type": wrong_type}).status_code == 415
        assert post(node, b"no parts here").status_code == 400
        # A client that goes away in the middle of its third instance: the two it sent whole
        # are kept, the third leaves nothing behind.
        body = multipart([p.read_bytes() for p in files])
        cut = body.index(files[2].read_bytes()) + 1000
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {content_type()}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        seen = len(node.log())
        with socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as sock:
            sock.sendall(head + body[:cut])
            time.sleep(0.5)
        wait_until(lambda: "STOW-RS request" in node.log()[seen:], 20, "the cut", node.log())
        assert "the request body ended early" in node.log()[seen:]
        node.assert_kept(files[:2], byte_identical=True)
        assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 2
        assert not list((node.data_dir / "tmp").iterdir())
        # An ended request whose instances broke off completes as an aborted association:
        # by the quiet time, not at once.
        assert "by association released" not in node.log()
    finally:
        node.stop()


@pytest.mark.integration
def test_a_token_is_required_when_set_and_the_transfer_is_audited(tmp_path: Path) -> None:
    node = node_with(tmp_path, http={"token": TOKEN})
    try:
        files = series(tmp_path / "ct", 2)
        body = multipart([p.read_bytes() for p in files])
        assert post(node, body).status_code == 401
        assert node.query("SELECT COUNT(*) FROM instances")[0][0] == 0
        response = post(node, body, Authorization=f"Bearer {TOKEN}")
        assert response.status_code == 200
        trail = read_trail(node.data_dir / "audit" / "audit.jsonl")
        transferred = [m for m in trail if event_id(m) == "DICOM Instances Transferred"]
        assert len(transferred) == 1
        (source,) = [p for p in transferred[0]["ActiveParticipant"] if p.get("UserIsRequestor")]
        assert source["UserID"] == "DICOMWEB"
    finally:
        node.stop()


@pytest.mark.integration
def test_mutual_tls_authorises_a_client_by_its_certificate(tmp_path: Path, pki: Path) -> None:
    tls = tls_scp(pki)
    node = node_with(tmp_path, http={"token": TOKEN, "tls": tls})
    try:
        files = series(tmp_path / "ct", 2)
        body = multipart([p.read_bytes() for p in files])
        url = f"https://127.0.0.1:{node.http_port}/dicom-web/studies"
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": content_type()}, method="POST"
        )
        context = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            assert response.status == 200
            stored = sequence(json.loads(response.read()), "00081199")
        assert len(stored) == 2
        assert stored[0]["00081190"]["Value"][0].startswith("https://")
        node.assert_kept(files, byte_identical=True)
        assert "(client)" in node.log()  # the certificate's name, in the log line
        # No certificate: the handshake fails, nothing is read.
        with pytest.raises((ssl.SSLError, OSError)):
            urllib.request.urlopen(
                request, context=client_context(pki / "ca.crt", None, None), timeout=30
            ).read()
    finally:
        node.stop()


@pytest.mark.integration
def test_real_world_files_are_stored_byte_for_byte_or_refused_with_a_reason(
    tmp_path: Path,
) -> None:
    """Every PS3.10 file of the corpus (vendors, transfer syntaxes, enhanced MR, SEG/SR from
    other tools) in requests of a few files each: each is either listed as stored and kept
    byte for byte, or listed as failed with a reason; the node never answers 500."""
    node = node_with(tmp_path)
    try:
        files = [paths[0] for paths in corpus_instances(CORPUS).values()]
        random.Random(19).shuffle(files)
        stored_files: list[Path] = []
        for start in range(0, len(files), 7):
            batch = files[start : start + 7]
            response = post(node, multipart([p.read_bytes() for p in batch]))
            assert response.status_code in (200, 202, 409), response.text
            body = response.json()
            listed = {i["00081155"]["Value"][0] for i in sequence(body, "00081199")}
            failed = sequence(body, "00081198")
            assert len(listed) + len(failed) == len(batch)
            assert all(i["00081197"]["Value"][0] for i in failed)
            stored_files += [
                p
                for p in batch
                if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in listed
            ]
        assert len(stored_files) > len(files) * 0.8
        node.assert_kept(stored_files, byte_identical=True)
    finally:
        node.stop()


@pytest.mark.integration
def test_public_real_world_files_each_stored_byte_for_byte_or_refused_with_a_reason(
    tmp_path: Path,
) -> None:
    """Every PS3.10 file that pydicom, pydicom-data, pynetdicom and nibabel ship (files from
    sources this project did not make or choose), each in a request of its own: listed as
    stored and kept byte for byte, or listed as failed with a reason; never a 400 or a 5xx."""
    node = node_with(tmp_path, store={"fsync": False}, worker={"enabled": False})
    try:
        files = [f.path for f in public_files()]
        stored = 0
        for path in files:
            response = post(node, multipart([path.read_bytes()]))
            assert response.status_code in (200, 409), (path, response.text)
            body = response.json()
            if not sequence(body, "00081199"):
                (failed,) = sequence(body, "00081198")
                assert failed["00081197"]["Value"][0] in (0xA700, 0xA900, 0xC000, 0x0122, 0xC122)
                continue
            # Kept as sent, behind the meta the node wrote; checked at once, since some of
            # these files share a SOP Instance UID and a later one replaces an earlier one.
            (item,) = sequence(body, "00081199")
            (row,) = node.query(
                "SELECT path FROM instances WHERE sop_instance_uid = ?",
                (item["00081155"]["Value"][0],),
            )
            assert dataset_bytes(node.data_dir / row[0])[1] == dataset_bytes(path)[1], path
            stored += 1
        assert len(files) > 200 and stored > len(files) * 0.7
    finally:
        node.stop()


@pytest.mark.integration
def test_orthanc_pushes_a_study_to_the_node_over_stow_rs(tmp_path: Path) -> None:
    lacking = missing_orthanc()
    if lacking:
        pytest.skip(f"needs {', '.join(lacking)}")
    node = node_with(tmp_path, http={"token": TOKEN})
    orthanc = Orthanc(
        tmp_path / "orthanc",
        extra={
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    "node": {
                        "Url": f"{node.http_url}/dicom-web/",
                        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
                    }
                },
            }
        },
    ).start()
    try:
        files = series(tmp_path / "ct", 12)
        for path in files:
            orthanc.upload(path)
        (study,) = json.loads(urllib.request.urlopen(f"{orthanc.url}/studies", timeout=10).read())
        request = urllib.request.Request(
            f"{orthanc.url}/dicom-web/servers/node/stow",
            data=json.dumps({"Resources": [study], "Synchronous": True}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
        # Orthanc sends what it holds: the data sets as uploaded, byte for byte.
        node.assert_kept(files, byte_identical=True)
        wait_until(lambda: "by association released" in node.log(), 10, "completion", node.log())
    finally:
        orthanc.stop()
        node.stop()
