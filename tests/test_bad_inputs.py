"""Bad inputs sent over DICOM to one real node (issue 7, item 1).

Each is refused at C-STORE with a PS3.4 B.2.3 failure status, or stored and then its series is
not routed, or its inference job fails, with the reason in words; no result is written for it
(nothing misplaced), and the node serves on: a normal study sent afterwards is processed.

Malformed data sets are built as bytes and sent exactly as built, under the transfer syntax
given, by pynetdicom streaming them from a Part-10 file (the C-STORE request's UIDs and the
presentation context come from the file meta, the data set is not re-encoded).
"""

from __future__ import annotations

import copy
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config

from dicom_node.input_checks import MAX_VOXELS
from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.store import encode_file_meta, store_key
from tests.support.dicomfiles import (
    corpus_instances,
    dataset_bytes,
    dciodvfy,
    storescu_acknowledged,
)
from tests.support.encoding import (
    cut_before,
    deep_sequence,
    element,
    encapsulated_pixel_data,
    encoded,
    put,
)
from tests.support.node import NodeProcess, wait_until

pytestmark = pytest.mark.integration

FAST = {"series_quiet_seconds": 1, "study_quiet_seconds": 1}
# In every generated instance; patient data must never reach the log above DEBUG.
PATIENT_ID = "BADINPUT-7421"
PATIENT_NAME = "Müller^Jürgen=山田^太郎"
LUNG = "lung-nodules-ct"
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # 0xA700 (disk below the watermark): test_association_policy

T = TypeVar("T")

# Streaming from the file sends the data set bytes as they are (dicom_node.scu sets it too).
_config.STORE_SEND_CHUNKED_DATASET = True


# -- sending ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One C-STORE: the request's SOP class and instance, the presentation context's transfer
    syntax, and the data set bytes, each what the test says and not necessarily consistent."""

    sop_class: str
    sop_instance: str
    syntax: str
    data: bytes


def sent(ds: Dataset, syntax: str = ExplicitVRLittleEndian, data: bytes | None = None) -> Sent:
    return Sent(ds.SOPClassUID, ds.SOPInstanceUID, syntax, encoded(ds) if data is None else data)


def c_store(node: NodeProcess, items: list[Sent], folder: Path) -> list[int]:
    """Send ``items`` in one association; the status of each C-STORE response."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, item in enumerate(items):
        paths.append(folder / f"{number:05d}.dcm")
        meta = encode_file_meta(item.sop_class, item.sop_instance, item.syntax, "BADINPUTS")
        paths[-1].write_bytes(meta + item.data)
    ae = AE(ae_title="BADINPUTS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for context in sorted({(i.sop_class, i.syntax) for i in items}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established, "the node did not accept an association"
    try:
        # A response without a status (an abort, a dead node) fails the test here.
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


# -- what the node recorded -------------------------------------------------------------------


def poll(check: Callable[[], T | None], timeout_s: float, what: str, node: NodeProcess) -> T:
    return cast(T, wait_until(check, timeout_s, what, node.log()))


def decision(node: NodeProcess, series_uid: str) -> dict:
    """The series' latest routing decision: {"routed": [...], "not_routed": {algorithm: why}}."""

    def latest() -> dict | None:
        rows = node.query(
            "SELECT routed, not_routed FROM routing_decisions WHERE level = 'series'"
            " AND subject_uid = ? ORDER BY generation DESC LIMIT 1",
            (series_uid,),
        )
        if not rows:
            return None
        return {
            "routed": [r["algorithm"] for r in json.loads(rows[0]["routed"])],
            "not_routed": {n["algorithm"]: n["reason"] for n in json.loads(rows[0]["not_routed"])},
        }

    return poll(latest, 30, "no routing decision for the series", node)


def finished_job(node: NodeProcess, series_uid: str, timeout_s: float = 180) -> dict:
    """The series' inference job once it succeeded or failed."""

    def done() -> dict | None:
        rows = node.query(
            "SELECT id, state, attempts, error FROM jobs WHERE kind = 'inference'"
            " AND subject_uid = ? ORDER BY id DESC LIMIT 1",
            (series_uid,),
        )
        return dict(rows[0]) if rows and rows[0]["state"] in ("succeeded", "failed") else None

    return poll(done, timeout_s, "the inference job did not finish", node)


def outputs_of(node: NodeProcess, job_id: int) -> dict[str, Path]:
    rows = node.query("SELECT kind, path FROM outputs WHERE job_id = ?", (job_id,))
    return {row["kind"]: node.data_dir / row["path"] for row in rows}


def stored(node: NodeProcess, sop_instance_uids: list[str]) -> int:
    marks = ",".join("?" * len(sop_instance_uids))
    return node.query(
        f"SELECT COUNT(*) FROM instances WHERE sop_instance_uid IN ({marks})",
        tuple(sop_instance_uids),
    )[0][0]


# -- the node ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    """One node for the module, with the default routing rules: the cases do not interfere,
    each being a series of its own."""
    workdir = tmp_path_factory.mktemp("bad-inputs")
    started = NodeProcess(workdir, {"assembly": FAST, "store": {"fsync": False}}).start()
    yield started
    if started.proc is not None and started.proc.poll() is None:
        started.kill()


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    status: int
    logged: str  # the refusal's reason, in the node's log


@dataclass(frozen=True)
class NotRouted:
    algorithm: str  # "*" when no algorithm may ever see the series
    reason: str


@dataclass(frozen=True)
class JobFailed:
    reason: str


Outcome = Refused | NotRouted | JobFailed


@dataclass(frozen=True)
class Case:
    items: list[Sent]
    outcome: Outcome


CASES: dict[str, Callable[[], Case]] = {}
SERIES_OF: dict[str, str] = {}  # SOP Instance UID -> Series Instance UID, of every case


def case(builder: Callable[[], Case]) -> Callable[[], Case]:
    CASES[builder.__name__.replace("_", " ")] = builder
    return builder


def ct(slices: int = 20) -> list[Dataset]:
    """A 32 x 32 axial chest CT phantom: routed to lung-nodules-ct when it has 20 slices."""
    spec = CtPhantomSpec(
        slices=slices, rows=32, columns=32, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )
    datasets = list(ct_series(spec))
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 192"
        SERIES_OF[ds.SOPInstanceUID] = ds.SeriesInstanceUID
    return datasets


def each(datasets: list[Dataset], change: Callable[[bytes], bytes], **kw: str) -> list[Sent]:
    return [sent(ds, data=change(encoded(ds)), **kw) for ds in datasets]


@case
def one_slice_ct() -> Case:
    return Case([sent(ds) for ds in ct(1)], NotRouted(LUNG, "1 slices, fewer than 20"))


@case
def deep_nesting_in_header() -> Case:
    (ds,) = ct(1)
    data = put(encoded(ds), 0x00081115, deep_sequence(0x00081115, 5000))
    return Case([sent(ds, data=data)], Refused(CANNOT_UNDERSTAND, "(RecursionError)"))


@case
def deep_nesting_after_header() -> Case:
    """Unparsable however far from the identifying attributes: refused, as documented
    (before, it was acknowledged and stored, and its series never routed)."""
    (ds,) = ct(1)
    data = put(encoded(ds), 0x00400275, deep_sequence(0x00400275, 5000))
    return Case([sent(ds, data=data)], Refused(CANNOT_UNDERSTAND, "(RecursionError)"))


@case
def deep_nesting_after_pixel_data() -> Case:
    """After encapsulated Pixel Data, where a Digital Signatures Sequence sits (PS3.3 C.12.1)."""
    (ds,) = ct(1)
    pixels = encapsulated_pixel_data(b"\xff\xd8" + bytes(30), b"\x00" * 16)
    data = cut_before(encoded(ds), 0x7FE00010) + pixels + deep_sequence(0xFFFAFFFA, 5000)
    return Case([sent(ds, JPEGBaseline8Bit, data)], Refused(CANNOT_UNDERSTAND, "(RecursionError)"))


@case
def encapsulated_pixel_data_without_end() -> Case:
    (ds,) = ct(1)
    data = cut_before(encoded(ds), 0x7FE00010) + encapsulated_pixel_data(bytes(64))[:-8]
    return Case(
        [sent(ds, JPEGBaseline8Bit, data)], Refused(CANNOT_UNDERSTAND, "Pixel Data has no end")
    )


@case
def unknown_vr_after_header() -> Case:
    spacing = element(0x00280030, b"ZZ", b"0.7\\0.7")
    return Case(
        each(ct(), lambda d: put(d, 0x00280030, spacing)),
        NotRouted("*", "20 stored instance(s) have unreadable headers"),
    )


@case
def explicit_vr_sent_as_implicit() -> Case:
    return Case(
        [sent(ds, ImplicitVRLittleEndian) for ds in ct(1)],
        Refused(CANNOT_UNDERSTAND, "encoded in explicit VR, but the transfer syntax"),
    )


@case
def implicit_vr_sent_as_explicit() -> Case:
    return Case(
        [sent(ds, data=encoded(ds, ImplicitVRLittleEndian)) for ds in ct(1)],
        Refused(CANNOT_UNDERSTAND, "encoded in implicit VR, but the transfer syntax"),
    )


@case
def little_endian_sent_as_big_endian() -> Case:
    return Case([sent(ds, ExplicitVRBigEndian) for ds in ct(1)], Refused(CANNOT_UNDERSTAND, ""))


@case
def not_deflated_sent_as_deflate() -> Case:
    return Case(
        [sent(ds, DeflatedExplicitVRLittleEndian) for ds in ct(1)],
        Refused(CANNOT_UNDERSTAND, "data set cannot be parsed (error)"),
    )


@case
def deflated_and_cut_short() -> Case:
    (ds,) = ct(1)
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = deflate.compress(encoded(ds)) + deflate.flush()
    return Case(
        [sent(ds, DeflatedExplicitVRLittleEndian, data=data[:40])],
        Refused(CANNOT_UNDERSTAND, "is missing"),
    )


@case
def cut_before_its_uids() -> Case:
    return Case(
        each(ct(1), lambda d: cut_before(d, 0x0020000D)),
        Refused(CANNOT_UNDERSTAND, "StudyInstanceUID is missing"),
    )


@case
def uid_with_wrong_vr() -> Case:
    (ds,) = ct(1)
    wrong = element(0x0020000E, b"UL", b"abcd")  # reads as the number 1684234849
    return Case(
        [sent(ds, data=put(encoded(ds), 0x0020000E, wrong))],
        Refused(CANNOT_UNDERSTAND, "SeriesInstanceUID is encoded as VR UL, not UI"),
    )


@case
def data_set_of_another_sop_class() -> Case:
    (ds,) = ct(1)
    item = sent(ds)
    ds.SOPClassUID = MRImageStorage
    return Case(
        [Sent(CTImageStorage, item.sop_instance, item.syntax, encoded(ds))],
        Refused(DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the C-STORE request's"),
    )


@case
def no_image_orientation() -> Case:
    datasets = ct()
    for ds in datasets:
        del ds.ImageOrientationPatient
    return Case([sent(ds) for ds in datasets], NotRouted(LUNG, "orientation (none) is not axial"))


@case
def no_image_position_on_one_slice() -> Case:
    datasets = ct()
    del datasets[9].ImagePositionPatient
    return Case(
        [sent(ds) for ds in datasets],
        JobFailed("1 of 20 instance(s) have no usable ImagePositionPatient"),
    )


@case
def mixed_frames_of_reference() -> Case:
    datasets = ct()
    other = generate_uid()
    for ds in datasets[10:]:
        ds.FrameOfReferenceUID = other
    return Case([sent(ds) for ds in datasets], JobFailed("in 2 frames of reference"))


@case
def duplicate_position() -> Case:
    """Slice 5 again, with a new UID and other pixels (a second reconstruction): which one
    would a SEG frame belong to?"""
    datasets = ct()
    again = copy.deepcopy(datasets[5])
    again.SOPInstanceUID = generate_uid()
    again.PixelData = bytes(len(again.PixelData))
    SERIES_OF[again.SOPInstanceUID] = again.SeriesInstanceUID
    return Case(
        [sent(ds) for ds in [*datasets, again]],
        JobFailed("1 of 21 instance(s) repeat another's ImagePositionPatient"),
    )


@case
def nan_pixel_spacing() -> Case:
    datasets = ct()
    for ds in datasets:
        ds.PixelSpacing = [float("nan"), float("nan")]
    return Case(
        [sent(ds) for ds in datasets],
        JobFailed("20 of 20 instance(s) have a PixelSpacing that is missing, not a number"),
    )


@case
def zero_pixel_spacing() -> Case:
    datasets = ct()
    for ds in datasets:
        ds.PixelSpacing = [0, 0]
    return Case(
        [sent(ds) for ds in datasets], JobFailed("PixelSpacing that is missing, not a number")
    )


@case
def truncated_pixel_data() -> Case:
    """Each data set ends 500 bytes into its Pixel Data (a sender that stopped mid-value)."""
    return Case(
        each(ct(), lambda d: d[:-500]),
        JobFailed("pixel data is 1548 bytes where Rows x Columns x frames x samples x bits"),
    )


@case
def pixel_data_shorter() -> Case:
    short = element(0x7FE00010, b"OW", bytes(32 * 32))
    datasets = ct()
    items = [sent(ds) for ds in datasets]
    items[3] = sent(datasets[3], data=put(encoded(datasets[3]), 0x7FE00010, short))
    return Case(items, JobFailed("1 of 20 instance(s): pixel data is 1024 bytes"))


@case
def pixel_data_longer() -> Case:
    long = element(0x7FE00010, b"OW", bytes(32 * 32 * 2 * 2))
    return Case(
        each(ct(), lambda d: put(d, 0x7FE00010, long)),
        JobFailed("pixel data is 4096 bytes where Rows x Columns x frames x samples x bits "
                  "(32 x 32 x 1 x 1 x 16) make 2048"),
    )  # fmt: skip


@case
def rows_zero() -> Case:
    datasets = ct()
    for ds in datasets:
        ds.Rows = 0
    return Case([sent(ds) for ds in datasets], JobFailed("Rows is '0' (VR US)"))


@case
def absurd_dimensions() -> Case:
    """65535 x 65535 pixels in 2^31 - 1 frames claimed, 2 kB sent."""
    datasets = ct()
    for ds in datasets:
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 2**31 - 1
    return Case(
        [sent(ds) for ds in datasets],
        JobFailed("pixel data is 2048 bytes where Rows x Columns x frames x samples x bits "
                  "(65535 x 65535 x 2147483647 x 1 x 16)"),
    )  # fmt: skip


@case
def decompression_bomb() -> Case:
    """RLE (PS3.5 G) claiming 65535 x 65535 pixels per slice in 74 bytes: decoding would
    allocate 4 GiB a slice before finding out; the node must not try."""
    segment = bytes([0x81, 0]) * 5  # "repeat 0 128 times", five times
    fragment = struct.pack("<2I", 1, 64) + bytes(56) + segment
    datasets = ct()
    for ds in datasets:
        ds.Rows = ds.Columns = 65535
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    return Case(
        each(datasets, lambda d: put(d, 0x7FE00010, encapsulated_pixel_data(fragment)),
             syntax=RLELossless),
        JobFailed(f"claims {20 * 65535 * 65535} voxels (Rows x Columns x frames x samples), "
                  f"more than the {MAX_VOXELS}"),
    )  # fmt: skip


@case
def rows_as_decimal_string() -> Case:
    rows = element(0x00280010, b"DS", b"32")
    return Case(
        each(ct(), lambda d: put(d, 0x00280010, rows)),
        JobFailed("Rows is '32' (VR DS), not a positive integer"),
    )


@case
def position_as_text() -> Case:
    position = element(0x00200032, b"LO", b"left\\back\\up")
    return Case(
        each(ct(), lambda d: put(d, 0x00200032, position)),
        JobFailed("20 of 20 instance(s) have no usable ImagePositionPatient"),
    )


@case
def uncompressed_sent_as_jpeg() -> Case:
    return Case(
        [sent(ds, JPEGBaseline8Bit) for ds in ct()],
        JobFailed("transfer syntax JPEG Baseline (Process 1) says the pixel data is compressed, "
                  "but it is not encapsulated"),
    )  # fmt: skip


@case
def unknown_character_set() -> Case:
    """An undefined term: names cannot be decoded for sure, so no result names the patient."""
    datasets = ct()
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.PatientName = "Muller^Jurgen"
    return Case(
        [sent(ds) for ds in datasets],
        JobFailed("SpecificCharacterSet 'ISO_IR 999' is not a defined term"),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(node: NodeProcess, tmp_path: Path, name: str) -> None:
    """Refused with its status and reason, or not routed, or its job failed, with the reason;
    in the latter two, nothing written from it."""
    case = CASES[name]()
    series_uid = SERIES_OF[case.items[0].sop_instance]
    seen = len(node.log())
    statuses = c_store(node, case.items, tmp_path)
    outcome = case.outcome
    if isinstance(outcome, Refused):
        assert set(statuses) == {outcome.status}, [hex(s) for s in statuses]
        assert stored(node, [i.sop_instance for i in case.items]) == 0
        logged = node.log()[seen:]
        assert f"C-STORE refused with 0x{outcome.status:04X}" in logged, logged
        assert outcome.logged in logged, logged
        # Which instance (hashed, as on disk) and which association; never the UID itself.
        for item in case.items:
            key = store_key(item.sop_instance)[:12]
            which = rf"\(instance {key}, association #\d+ from BADINPUTS at 127\.0\.0\.1\)"
            assert re.search(which, logged), logged
            assert item.sop_instance not in logged
        return
    assert set(statuses) == {SUCCESS}, [hex(s) for s in statuses]
    assert stored(node, [i.sop_instance for i in case.items]) == len(case.items)
    decided = decision(node, series_uid)
    if isinstance(outcome, NotRouted):
        assert decided["routed"] == [], decided
        assert outcome.reason in decided["not_routed"].get(outcome.algorithm, ""), decided
        assert not node.query("SELECT id FROM jobs WHERE kind = 'inference' AND subject_uid = ?",
                              (series_uid,))  # fmt: skip
        return
    assert decided["routed"] == [LUNG], decided
    job = finished_job(node, series_uid)
    assert job["state"] == "failed", job
    assert outcome.reason in job["error"], job["error"]
    # The reason in words in the log an operator reads (WARNING or above), not only at DEBUG.
    said = [line for line in node.log().splitlines() if f"job {job['id']} failed" in line]
    assert any(outcome.reason in line and " ERROR " in line for line in said), said
    assert job["attempts"] == 1, job  # the same input would fail the same way: not retried
    # Nothing written from it: no SEG on a wrong slice, no volume made of two.
    assert outputs_of(node, job["id"]) == {}


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"])
def test_compressed_series_the_decoders_cannot_read(
    node: NodeProcess, corpus: Path, tmp_path: Path, syntax: str
) -> None:
    """The corpus's JPEG extended slice (processes 6/8, 10/12: no installed decoder) made
    into a 20-slice chest CT, its compressed pixel data sent as they are."""
    (path,) = (corpus / "transfer-syntaxes-cornerstone/testImages").glob(
        f"CTImage.dcm_*_{syntax}.dcm"
    )
    source = dcmread(path)
    series_uid, study_uid = generate_uid(), generate_uid()
    items = []
    for index in range(20):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [*source.ImagePositionPatient[:2], 4.7 + 5.0 * index]
        items.append(sent(ds, syntax))
    assert set(c_store(node, items, tmp_path)) == {SUCCESS}
    assert decision(node, series_uid)["routed"] == [LUNG]
    job = finished_job(node, series_uid)
    assert job["state"] == "failed" and "pixel data not decodable" in job["error"], job
    assert job["attempts"] == 1, job
    assert outputs_of(node, job["id"]) == {}


def test_every_odd_corpus_file(node: NodeProcess, corpus: Path, tmp_path: Path) -> None:
    """Every corpus file but the two regular series (a CXR stored as Secondary Capture without
    a position, files without pixel data or pixel spacing, retired and undecodable JPEG, JPEG
    2000 without an extension, fragmented JPEG without an offset table, YBR_FULL_422, SEG,
    SR, parametric maps, slide microscopy, enhanced MR) is acknowledged, its series gets a
    recorded decision, and whatever is routed ends succeeded or failed with a reason."""
    regular = ("chest-ct-lung-pet-ct-dx", "brain-mr-sag-anon")
    paths = [
        path
        for paths in corpus_instances(corpus).values()
        for path in paths
        if path.relative_to(corpus).parts[0] not in regular
    ]
    assert len(paths) > 60, "the corpus looks incomplete"
    items, series = [], set()
    for path in paths:
        header = dcmread(path, stop_before_pixels=True)
        syntax, data = dataset_bytes(path)
        items.append(Sent(header.SOPClassUID, header.SOPInstanceUID, syntax, data))
        series.add(str(header.SeriesInstanceUID))
    statuses = c_store(node, items, tmp_path)
    # Real files, odd as they are, are stored: the quirks are for routing and inference.
    refused = {p.name: hex(s) for p, s in zip(paths, statuses, strict=True) if s != SUCCESS}
    assert not refused, refused
    decided = {uid: decision(node, uid) for uid in series}
    marks = ",".join("?" * len(series))

    def settled() -> list:
        rows = node.query(
            f"SELECT subject_uid, state, error FROM jobs WHERE kind = 'inference'"
            f" AND subject_uid IN ({marks})",
            tuple(series),
        )
        return rows if all(r["state"] in ("succeeded", "failed") for r in rows) else []

    jobs = poll(settled, 180, "inference jobs of the corpus files did not settle", node)
    for job in jobs:
        assert job["state"] == "succeeded" or job["error"], dict(job)
    # The quirk the corpus's README names: Modality CR in a Secondary Capture, no position.
    (cxr,) = [
        str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        for p in paths
        if p.name.startswith("1.2.276.0.7230010.3.1.4.8323329.6904")
    ]
    assert decided[cxr]["routed"] == ["pneumonia-cxr"], decided[cxr]
    assert finished_job(node, cxr)["state"] == "succeeded"


def test_retention_goes_on_past_an_unreadable_file(make_node, tmp_path: Path) -> None:
    """A stored file that pydicom cannot read (sequences nested thousands deep after the
    header) must not stop retention: before, reading its patient for the audit record raised
    RecursionError on every pass, and no study after it was ever deleted."""
    node = make_node(assembly=FAST)
    (unreadable,) = ct(1)
    assert c_store(node, [sent(unreadable)], tmp_path / "a") == [SUCCESS]
    node.stop()
    # Such a data set is refused at C-STORE now: made unreadable on disk after it was stored
    # (a damaged disk, or a file stored by a node before the refusal), then retention is on.
    (path,) = [node.data_dir / r[0] for r in node.query("SELECT path FROM instances")]
    data = put(encoded(unreadable), 0x00400275, deep_sequence(0x00400275, 5000))
    meta = encode_file_meta(
        unreadable.SOPClassUID, unreadable.SOPInstanceUID, ExplicitVRLittleEndian, "BADINPUTS"
    )
    path.write_bytes(meta + data)
    node.settings["retention"] = {"instances_hours": 0, "check_every_s": 0.2}
    node.start()
    (ordinary,) = ct(1)
    assert c_store(node, [sent(ordinary)], tmp_path / "b") == [SUCCESS]
    purged = "SELECT COUNT(*) FROM purges WHERE subject LIKE 'study:%'"
    assert node.wait_for(purged, 2, timeout_s=30) == 2, node.log()
    assert not list((node.data_dir / "instances").rglob("*.dcm"))
    assert "delivery loop error" not in node.log()


def test_japanese_names_with_code_extensions(node: NodeProcess, tmp_path: Path) -> None:
    """Not a bad input: value 1 empty, then ISO 2022 IR 87, as Japanese sites send names
    (PS3.5 H.3.1). highdicom refuses the empty value; the results must still be written, the
    names as sent."""
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    datasets = ct()
    for ds in datasets:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = name
    assert set(c_store(node, [sent(ds) for ds in datasets], tmp_path)) == {SUCCESS}
    job = finished_job(node, datasets[0].SeriesInstanceUID)
    assert job["state"] == "succeeded", job
    report_path = outputs_of(node, job["id"])["SR"]
    report = dcmread(report_path)
    assert str(report.PatientName) == name
    assert report.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert dciodvfy(report_path) == []


def test_node_still_serves_after_bad_inputs(node: NodeProcess, tmp_path: Path) -> None:
    """Last in the module: after every bad input, a normal chest CT from dcmtk's storescu
    (UTF-8 names, ISO_IR 192) is processed, its result names the patient as sent, and no
    thread died, no routing job failed, no patient data reached the log."""
    spec = CtPhantomSpec(
        slices=20, rows=64, columns=64, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )
    paths = []
    for ds in ct_series(spec):
        ds.SpecificCharacterSet = "ISO_IR 192"
        paths.append(tmp_path / f"{ds.InstanceNumber:02d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    result = node.storescu("-v", "-nh", files=paths)
    assert len(storescu_acknowledged(result.stdout + result.stderr)) == 20, result.stderr
    series_uid = str(dcmread(paths[0]).SeriesInstanceUID)
    assert decision(node, series_uid)["routed"] == [LUNG]
    job = finished_job(node, series_uid)
    assert job["state"] == "succeeded", job
    report = dcmread(outputs_of(node, job["id"])["SR"])
    assert str(report.PatientName) == PATIENT_NAME and report.PatientID == PATIENT_ID
    assert node.proc is not None and node.proc.poll() is None
    routing_failed = node.query(
        "SELECT COUNT(*) FROM jobs WHERE kind != 'inference' AND state = 'failed'"
    )[0][0]
    assert routing_failed == 0
    log = node.log()
    assert "Exception in thread" not in log and "routing job" not in log
    assert PATIENT_ID not in log and "Müller" not in log
