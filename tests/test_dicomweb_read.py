"""The node as a DICOMweb origin server, read side (PS3.18 10.4 WADO-RS, 10.6 QIDO-RS): a real
`dicom-node serve` that received a CT phantom by C-STORE and ran the lung-nodule detector on
it, and real-world corpus files in many encodings, read back with dicomweb-client and raw HTTP.

The truth is what the node stored (the files the index points at, read by pydicom), never
what the server computes."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import get_expected_length, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from dicom_node.dicomweb import FRAME_MEDIA_TYPES, decodable
from dicom_node.phantoms import write_ct_series
from dicom_node.scu import send
from dicom_node.testing import Orthanc, missing_orthanc
from tests.support.audit import event_id, objects, read_trail
from tests.support.cases import PHANTOMS
from tests.support.dicomweb import (
    CORPUS_FILES,
    client,
    corpus_copies,
    get,
    parts,
    split_multipart,
    wait_for_seg_and_sr,
)
from tests.support.node import NodeProcess, wait_until
from tests.support.paths import CORPUS
from tests.support.tls import client_context, tls_scp

pytestmark = pytest.mark.integration

TOKEN = "dicomweb-read-token"
CT = PHANTOMS["axial"]  # the demo lung-nodule weights find its nodule
CORPUS_NAMES = [f"{path.parent.name}/{path.name}" for path in CORPUS_FILES]


class Served:
    """The node, what it received and what it made."""

    def __init__(self, node: NodeProcess, ct: list[Path], corpus: dict[str, Path]) -> None:
        self.node = node
        self.ct = ct
        self.corpus = corpus
        self.ct_study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)

    def stored(self, sop: str) -> Path:
        (row,) = self.node.query(
            "SELECT path FROM instances WHERE sop_instance_uid = ?"
            " UNION ALL SELECT path FROM outputs WHERE sop_instance_uid = ?",
            (sop, sop),
        )
        return self.node.data_dir / row[0]

    def output(self, kind: str) -> tuple[str, str, Path]:
        """A result of ``kind``: its series UID, SOP Instance UID and stored file."""
        (row,) = self.node.query(
            "SELECT series_uid, sop_instance_uid, path FROM outputs WHERE kind = ?", (kind,)
        )
        return row[0], row[1], self.node.data_dir / row[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("dicomweb")
    ct = write_ct_series(work / "ct", CT)
    corpus = corpus_copies(work / "corpus") if CORPUS.is_dir() else {}
    (work / "node").mkdir()
    settings = {
        "assembly": {"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        "http": {"token": TOKEN},
    }
    node = NodeProcess(work / "node", settings).start()
    try:
        assert node.storescu(files=ct).returncode == 0, node.log()
        if corpus:
            send(list(corpus.values()), "127.0.0.1", node.port)  # each file its own context
        wait_for_seg_and_sr(node)
        yield Served(node, ct, corpus)
    finally:
        node.stop()


# -- QIDO-RS -----------------------------------------------------------------------------------


def test_search_lists_the_received_study_with_the_node_results(served) -> None:
    web = client(served.node, TOKEN)
    studies = {s["0020000D"]["Value"][0]: s for s in web.search_for_studies()}
    assert served.ct_study in studies
    study = studies[served.ct_study]
    header = dcmread(served.ct[0], stop_before_pixels=True)
    assert study["00100020"]["Value"] == [header.PatientID]
    assert study["00080020"]["Value"] == [header.StudyDate]
    # The CT series and the node's SEG and SR beside it.
    assert set(study["00080061"]["Value"]) == {"CT", "SEG", "SR"}
    assert study["00201206"]["Value"] == [3]
    assert study["00201208"]["Value"] == [len(served.ct) + 2]
    # dicomweb-client sends its Host header without the port (dicomweb_client/web.py, its
    # _http_get), and URLs are built from the Host header: a raw request shows them whole.
    assert study["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{served.ct_study}")
    (raw,) = get(served.node, f"/studies?StudyInstanceUID={served.ct_study}", token=TOKEN).json()
    assert raw["00081190"]["Value"] == [
        f"{served.node.http_url}/dicom-web/studies/{served.ct_study}"
    ]

    series = web.search_for_series(served.ct_study)
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "SEG", "SR"]
    counts = {s["00080060"]["Value"][0]: s["00201209"]["Value"][0] for s in series}
    assert counts == {"CT": len(served.ct), "SEG": 1, "SR": 1}
    (seg,) = web.search_for_series(served.ct_study, search_filters={"Modality": "SEG"})
    seg_series, seg_sop, _ = served.output("SEG")
    assert seg["0020000E"]["Value"] == [seg_series]
    instances = web.search_for_instances(served.ct_study, seg_series)
    assert [i["00080018"]["Value"][0] for i in instances] == [seg_sop]


def test_search_matches_keys_by_keyword_or_tag_with_ranges_and_paging(served) -> None:
    web = client(served.node, TOKEN)
    header = dcmread(served.ct[0], stop_before_pixels=True)

    def uids(**filters: str) -> list[str]:
        return [s["0020000D"]["Value"][0] for s in web.search_for_studies(search_filters=filters)]

    assert uids(PatientID=header.PatientID) == [served.ct_study]
    assert uids(**{"00100020": header.PatientID}) == [served.ct_study]
    assert uids(PatientID="no such patient") == []
    assert served.ct_study in uids(StudyDate=f"{header.StudyDate}-")
    assert served.ct_study in uids(StudyDate=f"-{header.StudyDate}")
    assert served.ct_study not in uids(StudyDate="19000101-19000102")
    assert uids(StudyInstanceUID=served.ct_study) == [served.ct_study]
    assert served.ct_study in uids(ModalitiesInStudy="SEG")
    assert served.ct_study in uids(PatientID=header.PatientID[:2] + "*")
    every = uids()
    assert sorted(every) == sorted(
        {r[0] for r in served.node.query("SELECT study_uid FROM instances")}
    )
    paged = [s["0020000D"]["Value"][0] for s in web.search_for_studies(limit=1, offset=1)]
    assert paged == every[1:2]
    # All instances of the study, and one by SOPInstanceUID given as a tag.
    instances = web.search_for_instances(served.ct_study)
    assert len(instances) == len(served.ct) + 2
    sop = str(dcmread(served.ct[3], stop_before_pixels=True).SOPInstanceUID)
    (found,) = web.search_for_instances(search_filters={"00080018": sop})
    assert found["0020000D"]["Value"] == [served.ct_study]
    assert found["00200013"]["Value"] == [int(dcmread(served.ct[3]).InstanceNumber)]
    # includefield: a known attribute is returned, an unknown one ignored.
    (study,) = web.search_for_studies(
        search_filters={"StudyInstanceUID": served.ct_study},
        fields=["PatientBirthDate", "NoSuchAttribute", "00180050"],
    )
    assert "00180050" in study


def test_no_match_is_an_empty_array(served) -> None:
    response = get(served.node, "/studies?PatientID=nobody", token=TOKEN)
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["Content-Type"].startswith("application/dicom+json")


# -- WADO-RS -----------------------------------------------------------------------------------


def test_instances_come_back_as_stored_or_in_the_default_syntax(served) -> None:
    sop = str(dcmread(served.ct[0], stop_before_pixels=True).SOPInstanceUID)
    stored = served.stored(sop)
    series = str(dcmread(stored, stop_before_pixels=True).SeriesInstanceUID)
    path = f"/studies/{served.ct_study}/series/{series}/instances/{sop}"
    response = get(
        served.node,
        path,
        token=TOKEN,
        accept='multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert response.status_code == 200
    ((media, body),) = parts(response)
    assert media.startswith("application/dicom")
    assert body == stored.read_bytes()

    web = client(served.node, TOKEN)
    ds = web.retrieve_instance(served.ct_study, series, sop)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, dcmread(stored).pixel_array)

    # A whole study: every instance once, results included.
    got = web.retrieve_study(served.ct_study)
    assert sorted(d.SOPInstanceUID for d in got) == sorted(
        r[0]
        for r in served.node.query(
            "SELECT sop_instance_uid FROM instances WHERE study_uid = ?"
            " UNION ALL SELECT sop_instance_uid FROM outputs WHERE study_uid = ?",
            (served.ct_study, served.ct_study),
        )
    )


def test_the_seg_and_sr_are_retrievable_with_metadata_and_bulk_data(served) -> None:
    web = client(served.node, TOKEN)
    seg_series, seg_sop, seg_path = served.output("SEG")
    stored = dcmread(seg_path)
    got = web.retrieve_instance(served.ct_study, seg_series, seg_sop)
    assert got.SOPClassUID == stored.SOPClassUID
    assert np.array_equal(got.pixel_array, stored.pixel_array)

    (metadata,) = web.retrieve_series_metadata(served.ct_study, seg_series)
    assert metadata["00080018"]["Value"] == [seg_sop]
    assert metadata["00280010"]["Value"] == [stored.Rows]
    # The BulkDataURI resolves, as multipart (PS3.18 default) or as a bare body (what OHIF's
    # single-part bulk data mode asks for with */*).
    (metadata,) = get(
        served.node, f"/studies/{served.ct_study}/series/{seg_series}/metadata", token=TOKEN
    ).json()
    uri = metadata["7FE00010"]["BulkDataURI"]
    assert uri.startswith(served.node.http_url + "/dicom-web/studies/")
    path = uri.removeprefix(served.node.http_url + "/dicom-web")
    multipart = get(
        served.node, path, token=TOKEN, accept="multipart/related; type=application/octet-stream"
    )
    assert [body for _, body in parts(multipart)] == [bytes(stored.PixelData)]
    bare = get(served.node, path, token=TOKEN, accept="*/*")
    assert bare.headers["Content-Type"] == "application/octet-stream"
    assert bare.content == bytes(stored.PixelData)
    # Frames of a 1-bit SEG: each frame packed on its own (PS3.5 8.1.1, PS3.18 8.7.3).
    frames = web.retrieve_instance_frames(served.ct_study, seg_series, seg_sop, [1, 2])
    expected = pixel_array(stored)
    for frame, want in zip(frames, expected[:2], strict=True):
        unpacked = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
        assert np.array_equal(unpacked[: want.size].reshape(want.shape), want)

    sr_series, sr_sop, _ = served.output("SR")
    (sr,) = web.retrieve_series_metadata(served.ct_study, sr_series)
    assert sr["0040A730"]["vr"] == "SQ"  # ContentSequence, inline
    assert web.retrieve_instance(served.ct_study, sr_series, sr_sop).SOPInstanceUID == sr_sop


def test_ct_frames_match_the_stored_pixels(served) -> None:
    web = client(served.node, TOKEN)
    for path in served.ct[:3]:
        header = dcmread(path, stop_before_pixels=True)
        stored = dcmread(served.stored(str(header.SOPInstanceUID)))
        (frame,) = web.retrieve_instance_frames(
            served.ct_study, str(header.SeriesInstanceUID), str(header.SOPInstanceUID), [1]
        )
        got = np.frombuffer(frame, stored.pixel_array.dtype).reshape(stored.pixel_array.shape)
        assert np.array_equal(got, stored.pixel_array)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_files_come_back_pixel_for_pixel(served, name: str) -> None:
    """A property over the corpus's real-world encodings: every stored file is found by search,
    comes back byte for byte as stored, in Explicit VR Little Endian with the same pixels when
    pydicom can decode it (406 saying why when not), and frame by frame."""
    if name not in served.corpus:
        pytest.skip(f"{name}: not in this corpus, or pydicom cannot give it new UIDs")
    source = served.corpus[name]
    header = dcmread(source, stop_before_pixels=True)
    sop, series, study = (
        str(header.SOPInstanceUID),
        str(header.SeriesInstanceUID),
        str(header.StudyInstanceUID),
    )
    if not served.node.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop,)):
        pytest.fail(f"{name}: the node refused it at C-STORE")
    stored_path = served.stored(sop)
    stored = dcmread(stored_path)
    syntax = UID(str(stored.file_meta.TransferSyntaxUID))
    base = f"/studies/{study}/series/{series}/instances/{sop}"

    (found,) = client(served.node, TOKEN).search_for_instances(
        search_filters={"SOPInstanceUID": sop}
    )
    assert found["00080016"]["Value"] == [str(stored.SOPClassUID)]

    as_stored = get(
        served.node,
        base,
        token=TOKEN,
        accept='multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert parts(as_stored)[0][1] == stored_path.read_bytes()

    default = get(served.node, base, token=TOKEN)
    can_decode = decodable(syntax)
    if not can_decode:
        assert default.status_code == 406
        assert str(syntax) in default.json()["error"]
    else:
        assert default.status_code == 200, default.text
        ((media, body),) = parts(default)
        assert "1.2.840.10008.1.2.1" in media
        got = dcmread(io.BytesIO(body))
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(pixel_array(got, raw=True), pixel_array(stored, raw=True))

    metadata = get(served.node, base + "/metadata", token=TOKEN).json()
    assert metadata[0]["00080018"]["Value"] == [sop]
    frames = int(stored.get("NumberOfFrames") or 1)
    wanted = sorted({1, frames})
    listed = ",".join(map(str, wanted))
    if syntax.is_encapsulated and str(syntax) in FRAME_MEDIA_TYPES:
        response = get(
            served.node,
            f"{base}/frames/{listed}",
            token=TOKEN,
            accept="multipart/related; type=application/octet-stream; transfer-syntax=*",
        )
        assert response.status_code == 200
        encoded = list(generate_frames(stored.PixelData, number_of_frames=frames))
        got_parts = parts(response)
        assert [b for _, b in got_parts] == [encoded[n - 1] for n in wanted]
        assert all(FRAME_MEDIA_TYPES[str(syntax)] in m for m, _ in got_parts)
    native = get(served.node, f"{base}/frames/{listed}", token=TOKEN)
    if not can_decode:
        assert native.status_code == 406
        return
    assert native.status_code == 200, native.text
    got_parts = parts(native)
    assert all(m.startswith("application/octet-stream") for m, _ in got_parts)
    if not syntax.is_encapsulated and syntax != ExplicitVRBigEndian:
        # Native little endian: each frame's bytes as stored (YBR_FULL_422 stays subsampled).
        size = get_expected_length(stored, "bytes") // frames
        raw = bytes(stored.PixelData)
        assert [b for _, b in got_parts] == [raw[(n - 1) * size : n * size] for n in wanted]
        return
    decoded = pixel_array(stored, raw=True)
    if frames == 1:
        decoded = decoded[np.newaxis]
    for (_, body), n in zip(got_parts, wanted, strict=True):
        want = decoded[n - 1]
        got_frame = np.frombuffer(body, want.dtype.newbyteorder("<")).reshape(want.shape)
        assert np.array_equal(got_frame, want)


# -- refusals ----------------------------------------------------------------------------------


def test_searches_and_retrievals_are_audited_frames_are_not(served) -> None:
    """PS3.15 A.5.3: a QIDO-RS search is a Query, a WADO-RS retrieval of instances or metadata
    Instances Transferred with the study; the client is the requestor. Frames are not audited
    one by one (a viewer asks for hundreds after the metadata it was audited for)."""
    trail_path = served.node.data_dir / "audit" / "audit.jsonl"
    seen = len(read_trail(trail_path))
    study = served.ct_study
    assert get(served.node, f"/studies?StudyInstanceUID={study}", token=TOKEN).status_code == 200
    assert get(served.node, f"/studies/{study}/metadata", token=TOKEN).status_code == 200
    sop = str(dcmread(served.ct[0], stop_before_pixels=True).SOPInstanceUID)
    series = str(dcmread(served.ct[0], stop_before_pixels=True).SeriesInstanceUID)
    frame = f"/studies/{study}/series/{series}/instances/{sop}/frames/1"
    assert get(served.node, frame, token=TOKEN).status_code == 200
    assert get(served.node, "/studies/1.2.3.4.5/metadata", token=TOKEN).status_code == 404
    # The server audits a request after its response is sent: the last may not be written yet.
    wait_until(
        lambda: len(read_trail(trail_path)) >= seen + 3,
        timeout_s=10,
        what="the audit messages of the three audited requests",
    )
    new = read_trail(trail_path)[seen:]
    assert [(event_id(m), m["EventIdentification"]["EventOutcomeIndicator"]) for m in new] == [
        ("Query", 0),
        ("DICOM Instances Transferred", 0),
        ("DICOM Instances Transferred", 4),
    ]
    query, retrieval = new[0], new[1]
    assert (
        base64.b64decode(
            query["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"]
        ).decode()
        == f"/dicom-web/studies?StudyInstanceUID={study}"
    )
    assert objects(retrieval)["Study Instance UID"] == study
    (requestor,) = [p for p in retrieval["ActiveParticipant"] if p["UserIsRequestor"]]
    assert (requestor["UserID"], requestor["NetworkAccessPointID"]) == (
        "bearer token",
        "127.0.0.1",
    )


def test_the_token_is_required(served) -> None:
    assert get(served.node, "/studies", token=None).status_code == 401
    assert get(served.node, "/studies", token="wrong").status_code == 401


@pytest.mark.parametrize(
    ("path", "accept", "status"),
    [
        ("/studies/1.2.3.4.5", None, 404),
        ("/studies/1.2.3.4.5/metadata", None, 404),
        ("/studies/1.2.3.4.5/series", None, 404),
        ("/studies/1.2.abc", None, 400),
        ("/studies/1..2", None, 400),
        ("/studies/" + "1." * 40 + "1", None, 400),
        ("/studies?NoSuchKeyword=1", None, 400),
        ("/studies?limit=many", None, 400),
        ("/nothing", None, 404),
        ("{study}/metadata", "multipart/related; type=application/dicom+xml", 406),
        (
            "{study}",
            "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50",
            406,
        ),
        ("{study}", "image/png", 406),
        ("{study}/rendered", None, 406),
    ],
)
def test_bad_requests_are_refused_with_a_reason(served, path: str, accept, status: int) -> None:
    path = path.replace("{study}", f"/studies/{served.ct_study}")
    response = get(served.node, path, token=TOKEN, accept=accept)
    assert response.status_code == status, response.text[:300]
    assert json.loads(response.content)["error"]


def test_a_file_removed_by_retention_is_neither_listed_nor_served(served, tmp_path) -> None:
    """Deleted by hand here as retention deletes: the index keeps the row, the file is gone."""
    victim = served.ct[-1]
    header = dcmread(victim, stop_before_pixels=True)
    sop = str(header.SOPInstanceUID)
    path = served.stored(sop)
    kept = tmp_path / "kept.dcm"
    kept.write_bytes(path.read_bytes())
    path.unlink()
    try:
        web = client(served.node, TOKEN)
        listed = web.search_for_instances(served.ct_study, str(header.SeriesInstanceUID))
        assert sop not in {i["00080018"]["Value"][0] for i in listed}
        assert len(listed) == len(served.ct) - 1
        base = f"/studies/{served.ct_study}/series/{header.SeriesInstanceUID}/instances/{sop}"
        assert get(served.node, base, token=TOKEN).status_code == 404
        assert get(served.node, base + "/frames/1", token=TOKEN).status_code == 404
        assert (
            len(web.retrieve_series(served.ct_study, str(header.SeriesInstanceUID)))
            == len(served.ct) - 1
        )
    finally:
        path.write_bytes(kept.read_bytes())


def test_orthanc_pulls_a_study_with_its_results_from_the_node(served, tmp_path) -> None:
    """A PACS as the client: Orthanc's DICOMweb plugin searches the node (QIDO-RS) and
    retrieves the study (WADO-RS) into its own store, the node's SEG and SR included."""
    lacking = missing_orthanc()
    if lacking:
        pytest.skip(f"needs {', '.join(lacking)}")
    server = {
        "Url": f"{served.node.http_url}/dicom-web/",
        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
    }
    dicomweb = {"Enable": True, "Root": "/dicom-web/", "Servers": {"node": server}}
    orthanc = Orthanc(tmp_path / "orthanc", extra={"DicomWeb": dicomweb}).start()
    try:
        found = orthanc.post(
            "/dicom-web/servers/node/qido",
            {"Uri": "/studies", "Arguments": {"StudyInstanceUID": served.ct_study}},
        )
        # Orthanc answers its own simplified form: one "Value" string per attribute.
        assert [s["0020000D"]["Value"] for s in found] == [served.ct_study]
        orthanc.post(
            "/dicom-web/servers/node/retrieve", {"Resources": [{"Study": served.ct_study}]}
        )
        held = {
            orthanc.get(f"/instances/{i}/tags?simplify")["SOPInstanceUID"]
            for i in orthanc.get("/instances")
        }
    finally:
        orthanc.stop()
    expected = {
        r[0]
        for r in served.node.query(
            "SELECT sop_instance_uid FROM instances WHERE study_uid = ?"
            " UNION ALL SELECT sop_instance_uid FROM outputs WHERE study_uid = ?",
            (served.ct_study, served.ct_study),
        )
    }
    assert held == expected
    assert served.output("SEG")[1] in held and served.output("SR")[1] in held


def test_over_mutual_tls_a_certificate_authorises_and_uris_are_https(tmp_path, pki) -> None:
    """HTTPS with a client certificate (http.tls): reads are authorised by it as by the token,
    the URIs the node writes are https on the address the client used, and a streamed study
    comes whole over TLS."""
    tls = tls_scp(pki)
    ct = write_ct_series(tmp_path / "ct", replace(CT, slices=4, rows=64, columns=64))
    (tmp_path / "node").mkdir()
    node = NodeProcess(tmp_path / "node", {"http": {"token": TOKEN, "tls": tls}}).start()
    context = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")

    def fetch(url: str, accept: str | None = None) -> tuple[str, bytes]:
        headers = {} if accept is None else {"Accept": accept}
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            assert response.status == 200
            return response.headers["Content-Type"], response.read()

    try:
        assert send(ct, "127.0.0.1", node.port).ok
        header = dcmread(ct[0], stop_before_pixels=True)
        base = f"https://127.0.0.1:{node.http_port}/dicom-web"
        study = f"{base}/studies/{header.StudyInstanceUID}"
        (found,) = json.loads(fetch(f"{base}/studies")[1])
        assert found["00081190"]["Value"] == [study]
        metadata = json.loads(fetch(f"{study}/metadata")[1])
        uri = metadata[0]["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"{study}/series/")
        assert fetch(uri, "*/*")[1] == bytes(dcmread(ct[0]).PixelData)
        assert len(split_multipart(*fetch(study))) == len(ct)
    finally:
        node.stop()
